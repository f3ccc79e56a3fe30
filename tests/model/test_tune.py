"""Ray Tune sweeps: ASHA stops weak trials, the leaderboard, promotion, resume, and bad input caught up front."""

import ast
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from ray.tune.search.variant_generator import generate_variants

import boneage.tune
from boneage.bundle import load_bundle, read_best, resolve
from boneage.config import load_config
from boneage.curves import CURVES
from boneage.dataset import read_manifest
from boneage.tune import (BASE, SweepError, parse_search_space, run_sweep, sweep_name, trial_concurrency,
                          trial_config, trial_space, write_leaderboard)
from helpers import ROOT, as_logged, read_curves, session_env, train_config, train_overrides, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")

SPACE = "{model.head: {choice: [[8], [16]]}, train.lr: {loguniform: [3.0e-4, 3.0e-3]}}"
SWEEP = ("train.max_failures=0", f"tune.search_space={SPACE}", "tune.num_samples=4", "tune.max_epochs=3",
         "tune.grace_period=1", "tune.reduction_factor=2",
         # One trial at a time (the session has 4 CPUs): each trial reaches ASHA's rungs after the one before it
         # ended, so ASHA's decisions follow from the trials' val MAE alone, not from a busy machine's timing.
         "tune.data_cpus=3")
ASHA_RUNGS = (1, 2)  # epochs at which ASHA judges a trial: grace period 1, reduction factor 2, below max_epochs 3
STOPPED, COMPLETED = "stopped early (ASHA)", "completed"


def sweep_overrides(prepared: Path, work: Path, *extra: str) -> list[str]:
    """The shared tiny training settings and this file's sweep, as ``--set`` overrides."""
    return train_overrides(prepared, work, *SWEEP, *extra)


def sweep_config(prepared: Path, work: Path, *extra: str):
    return load_config(overrides=sweep_overrides(prepared, work, *extra))


def seed_best(cfg, manifest: dict, val_mae: float) -> None:
    """Pretend an earlier model (version 99) is best with this val MAE on the same validation split."""
    folder = Path(cfg.registry.root) / cfg.registry.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best.json").write_text(json.dumps({"version": 99, "val_mae": val_mae,
                                                  "manifest_fingerprint": manifest["fingerprint"]}))


@pytest.mark.slow
def test_sweep_stops_weak_trials_early_writes_a_leaderboard_and_promotes_a_better_model(prepared_dir, tmp_path):
    cfg = sweep_config(prepared_dir, tmp_path)
    seed_best(cfg, read_manifest(prepared_dir), val_mae=1e9)  # a weak incumbent
    free_before = free_cpus()  # not the cluster's total: a session-wide Serve replica may hold some
    outcome = run_sweep(cfg)

    table = outcome.table
    assert len(table) == 4 and set(table.columns) >= {"trial", "model.head", "train.lr", "epochs", "best_val_mae",
                                                       "status", "wall_seconds", "val_mae"}
    sweep = tmp_path / "runs" / sweep_name(cfg, read_manifest(prepared_dir))
    histories = {trial: heard_val_mae(sweep, trial) for trial in table["trial"]}
    statuses = dict(zip(table["trial"], table["status"]))
    assert statuses == asha_decisions(histories)  # ASHA's rule, applied to what the trials reported
    assert STOPPED in statuses.values() and COMPLETED in statuses.values()
    assert table["best_val_mae"].is_monotonic_increasing  # best first
    assert (table.loc[table["status"] == "completed", "epochs"] == 3).all()
    curves = table["val_mae"].str.split().map(lambda values: [float(v) for v in values])
    assert (curves.map(len) == table["epochs"]).all()
    assert curves.map(min).tolist() == pytest.approx(table["best_val_mae"].tolist(), abs=0.051)
    assert pd.read_csv(outcome.leaderboard).shape[0] == 4
    assert "| trial" in (outcome.leaderboard.parent / "leaderboard.md").read_text()

    assert_one_tensorboard_run_per_trial(tmp_path / "runs", sweep_name(cfg, read_manifest(prepared_dir)), table)

    # A stopped trial's Train run is torn down within seconds on a quiet machine; a loaded 2-core one took over 60 s.
    wait_until(lambda: free_cpus() == free_before, f"{free_before:g} CPUs free again, as before the sweep "
               "(a stopped trial's Train run kept its CPUs)")

    assert outcome.promoted and "beats version 99" in outcome.promotion
    assert resolve(f"{cfg.registry.name}:best", cfg.registry.root) == outcome.bundle
    meta = json.loads((outcome.bundle / "bundle.json").read_text())
    assert meta["metrics"]["val_mae"] == pytest.approx(table["best_val_mae"].iloc[0])
    best = table.iloc[0]  # the bundle states the settings its trial trained with
    assert (meta["model"]["head"], meta["train"]["lr"], meta["train"]["epochs"]) == (best["model.head"],
                                                                                    best["train.lr"], 3)


def heard_val_mae(sweep: Path, trial: str) -> list[float]:
    """A trial's val MAE epoch by epoch, as Tune heard it (its CSV log, at full precision)."""
    return pd.read_csv(sweep / f"trial-{trial}" / "progress.csv")["val_mae"].tolist()


def asha_decisions(histories: dict[str, list[float]]) -> dict[str, str]:
    """What ASHA (reduction factor 2, minimising) decides for trials run one after another in trial-id order: at
    each rung a trial stops when its val MAE is worse than the median of those the rung recorded before it."""
    recorded: dict[int, list[float]] = {rung: [] for rung in ASHA_RUNGS}
    decisions = {}
    for trial in sorted(histories):
        decisions[trial] = COMPLETED
        for rung in ASHA_RUNGS:
            mae = histories[trial][rung - 1]
            stops = bool(recorded[rung]) and mae > np.median(recorded[rung])
            recorded[rung].append(mae)
            if stops:
                decisions[trial] = STOPPED
                break
    return decisions


def assert_one_tensorboard_run_per_trial(runs: Path, sweep: str, table: pd.DataFrame) -> None:
    """Each trial's Train run holds its curves, epoch by epoch as Tune heard them; nothing else is drawn (Tune's own
    TensorBoard logger would draw each trial again in the sweep's folder)."""
    drawn = {events.parent for events in runs.rglob("events.out.tfevents.*")}
    assert drawn == {runs / f"{sweep}-{trial}" for trial in table["trial"]}
    for row in table.itertuples():
        curves = read_curves(runs / f"{sweep}-{row.trial}")
        assert set(curves) == set(CURVES)
        # A trial ASHA stopped may have finished one more epoch before its Train run was stopped: drawn, not heard.
        assert all(sorted(points) == list(range(1, len(points) + 1)) and len(points) in (row.epochs, row.epochs + 1)
                   for points in curves.values())
        val_mae = [curves["val_mae"][epoch] for epoch in range(1, row.epochs + 1)]
        assert val_mae == pytest.approx([float(v) for v in row.val_mae.split()], abs=0.051)
        assert min(val_mae) == as_logged(row.best_val_mae)


def free_cpus() -> float:
    """The cluster's CPUs no task or actor holds now."""
    return ray.available_resources().get("CPU", 0.0)


@pytest.mark.slow
def test_sweep_leaves_a_stronger_best_alone_and_exports_its_best_trials_as_one_ensemble(prepared_dir, tmp_path):
    cfg = sweep_config(prepared_dir, tmp_path, "tune.num_samples=2", "tune.max_epochs=1")
    seed_best(cfg, read_manifest(prepared_dir), val_mae=0.5)
    outcome = run_sweep(cfg)
    assert not outcome.promoted and "does not beat" in outcome.promotion
    assert outcome.bundle is not None  # registered, just not promoted
    assert read_best(cfg.registry.root, cfg.registry.name)["version"] == 99
    # The finished sweep, rerun with tune.ensemble_size=2 (not part of its name): no trial reruns, one ensemble
    again = run_sweep(sweep_config(prepared_dir, tmp_path, "tune.num_samples=2", "tune.max_epochs=1",
                                   "tune.ensemble_size=2"))
    assert again.table[["trial", "best_val_mae"]].equals(outcome.table[["trial", "best_val_mae"]])
    ensemble = load_bundle(again.bundle)
    assert again.bundle.name == "2" and len(ensemble.members) == 2 and ensemble.ood is not None
    assert [m.val_mae for m in ensemble.meta.members] == pytest.approx(list(outcome.table["best_val_mae"]))
    assert ensemble.meta.members[0].weights_sha256 == load_bundle(outcome.bundle).meta.weights_sha256  # best first
    assert not again.promoted


@pytest.mark.slow
def test_a_crashing_trial_is_marked_failed_and_the_sweep_goes_on(prepared_dir, tmp_path):
    cfg = sweep_config(prepared_dir, tmp_path, "tune.num_samples=2", "tune.max_epochs=1",
                       "tune.search_space={model.weights: {choice: [/no/such/vgg16.pth]}}")
    outcome = run_sweep(cfg)
    assert list(outcome.table["status"]) == ["failed", "failed"]  # both ran: the first failure did not stop it
    assert outcome.bundle is None and not outcome.promoted
    assert read_best(cfg.registry.root, cfg.registry.name) is None


@pytest.mark.slow
def test_rerunning_an_interrupted_sweep_does_not_rerun_finished_trials(prepared_dir, tmp_path, ray_session):
    overrides = sweep_overrides(prepared_dir, tmp_path, "tune.num_samples=2", "tune.max_epochs=1")
    # The job derives the sweep's name itself, from the same settings: a rerun finds the sweep by that name.
    name = sweep_name(load_config(ROOT / "configs" / "tune.yaml", overrides), read_manifest(prepared_dir))
    command = [sys.executable, "jobs/tune.py", "--config", "configs/tune.yaml", "--set", *overrides]
    env = session_env(ray_session)
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sweep = tmp_path / "runs" / name
    finished = wait_until(lambda: finished_trials(sweep), f"a finished trial in {sweep}", timeout=600)
    first.send_signal(signal.SIGKILL)  # the driver dies mid-sweep
    first.wait()
    stamps = {t: snapshot_time(tmp_path / "runs", name, t) for t in finished}
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "leaderboard: " in second.stdout
    for trial, stamp in stamps.items():  # finished trials were not trained again
        assert snapshot_time(tmp_path / "runs", name, trial) == stamp
    board = pd.read_csv(sweep / "leaderboard.csv")
    assert len(board) == 2 and set(finished) < set(board["trial"])  # the rerun trained the unfinished one


def finished_trials(sweep: Path) -> list[str]:
    """Trial ids Tune has recorded as TERMINATED in its experiment state (none yet: empty)."""
    for state in sweep.glob("experiment_state-*.json"):
        try:
            # each entry is [trial JSON, runtime metadata JSON]
            trials = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
        except (ValueError, KeyError, TypeError):
            continue  # being rewritten
        done = [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]
        if done:
            return done
    return []


def snapshot_time(runs: Path, sweep: str, trial: str) -> int:
    return (runs / f"{sweep}-{trial}" / "checkpoint_manager_snapshot.json").stat().st_mtime_ns


@pytest.mark.parametrize("space, words", [
    ("{}", ["tune.search_space is empty", "train.lr"]),
    ("{train.lrr: {loguniform: [1.0e-4, 1.0e-2]}}", ["'train.lrr' cannot be searched", "train.lr", "model.head"]),
    ("{train.lr: {gaussian: [0, 1]}}", ["train.lr", "choice", "loguniform"]),
    ("{train.lr: {loguniform: [0, 1.0e-2]}}", ["train.lr.loguniform", "low > 0"]),
    ("{train.lr: {uniform: [5, 6]}}", ["train.lr", "out of range"]),
    ("{model.pooling: {choice: [avg, mean]}}", ["model.pooling", "'mean' is not a valid choice"]),
    ("{model.head: {choice: []}}", ["non-empty list"]),
    ("{train.freeze_epochs: {randint: [0.5, 3]}}", ["train.freeze_epochs.randint", "whole numbers"]),
    ("{train.unfreeze_blocks: {randint: [2, 6]}}", ["train.unfreeze_blocks", "out of range"]),  # the top end counts
])
def test_bad_search_spaces_fail_before_any_trial(tmp_path, space, words):
    cfg = train_config(tmp_path, tmp_path, f"tune.search_space={space}")
    with pytest.raises(SweepError) as err:
        parse_search_space(cfg.tune.search_space, cfg)
    for word in words:
        assert word in str(err.value)


def test_a_metric_training_never_reports_fails_before_any_trial(prepared_dir, tmp_path):
    cfg = sweep_config(prepared_dir, tmp_path, "tune.metric=val_accuracy")
    with pytest.raises(SweepError, match="tune.metric='val_accuracy' is never reported.*val_mae"):
        run_sweep(cfg)
    assert not (tmp_path / "runs").exists()


def test_too_few_resources_for_one_trial_fail_before_any_trial(prepared_dir, tmp_path):
    cfg = sweep_config(prepared_dir, tmp_path, "train.num_workers=8")
    with pytest.raises(SweepError, match="one trial needs 8 CPUs.*lower train.num_workers"):
        run_sweep(cfg)
    assert not (tmp_path / "runs").exists()


def test_concurrency_follows_the_cluster(tmp_path):
    cfg = train_config(tmp_path, tmp_path, "train.num_workers=2", "tune.num_samples=8", "tune.data_cpus=1")
    assert trial_concurrency(cfg, {"CPU": 9.0}) == 4
    assert trial_concurrency(cfg, {"CPU": 3.0}) == 1
    gpu = train_config(tmp_path, tmp_path, "train.num_workers=1", "train.use_gpu=true", "tune.num_samples=8")
    assert trial_concurrency(gpu, {"CPU": 64.0, "GPU": 3.0}) == 3
    with pytest.raises(SweepError, match="1 GPUs"):
        trial_concurrency(gpu, {"CPU": 64.0})


def test_leaderboard_markdown_keeps_trial_ids_and_histories_as_text(tmp_path):
    """Trial ids are hex: 09960_00001 or 3e4_00002 read as numbers to Python's float(), underscores and all."""
    table = pd.DataFrame({"trial": ["09960_00001", "3e4_00002"], "train.lr": [3.2968e-4, 1.9516e-3],
                          "best_val_mae": [25.551, 29.852], "val_mae": ["25.6", "29.9"], "error": ["", "boom"]})
    write_leaderboard(table, tmp_path)
    header, rule, first, second = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert header.startswith("| trial ") and rule.startswith("|:---")  # text: left-aligned
    assert [cell.strip() for cell in first.strip("|").split("|")] == ["09960_00001", "0.0003297", "25.55", "25.6"]
    assert second.startswith("| 3e4_00002 ")
    assert "boom" not in second and pd.read_csv(tmp_path / "leaderboard.csv")["error"].tolist()[1] == "boom"


def test_randint_draws_every_whole_number_from_low_to_high(tmp_path):
    """``randint: [low, high]`` reads inclusive, though Tune's own upper bound is exclusive: sampled on Tune's real
    sampler, both ends appear and nothing outside them."""
    cfg = train_config(tmp_path, tmp_path, "tune.search_space={train.unfreeze_blocks: {randint: [3, 5]}}")
    domain = parse_search_space(cfg.tune.search_space, cfg)["train.unfreeze_blocks"]
    draws = domain.sample(size=600)  # a missing end by chance: (2/3)^600
    assert set(draws) == {3, 4, 5}


def test_a_trial_config_is_the_sweep_config_with_the_trial_draws(tmp_path):
    """Tune records each trial's draws with the sweep's config (:func:`trial_space`); the trial trains with what
    :func:`trial_config` makes of that record and its bundle states the same, so the two cannot differ."""
    cfg = train_config(tmp_path, tmp_path, *SWEEP, "augment.zoom_range=0.1")
    space = parse_search_space(cfg.tune.search_space, cfg)
    for seed in range(5):
        [(_, resolved)] = generate_variants(trial_space(cfg, space), random_state=np.random.default_rng(seed))
        [(_, draws_alone)] = generate_variants(space, random_state=np.random.default_rng(seed))
        assert {k: v for k, v in resolved.items() if k != BASE} == draws_alone  # a seed draws what it drew before
        trial = trial_config(resolved)
        assert (trial.model.head, trial.train.lr) == (resolved["model.head"], resolved["train.lr"])
        assert trial.model.head in ([8], [16]) and 3e-4 <= trial.train.lr <= 3e-3
        assert trial.train.epochs == cfg.tune.max_epochs == 3  # what ASHA lets the best trials run
        assert (trial.data, trial.augment, trial.registry, trial.tune) == (cfg.data, cfg.augment, cfg.registry,
                                                                            cfg.tune)


def test_tune_imports_the_ray_modules_it_names():
    """tune.py once called ``ray.train.Checkpoint`` with only ``import ray``: it worked because boneage.train
    happened to import ray.train first."""
    tree = ast.parse(Path(boneage.tune.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    named = {ast.unparse(node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and ast.unparse(node.value).startswith("ray.")}
    assert named <= imported

"""Ray Train: local mode, 2 workers, a killed worker, a killed and resubmitted driver, NaN loss, the bundle,
the weight average."""

import json
import logging
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch

from boneage.bundle import load_bundle, promote_if_better, read_best, read_meta, register, versions
from boneage.config import load_config, save_config
from boneage.curves import CURVES
from boneage.dataset import MANIFEST, read_manifest, split_path
from boneage.train import REPORTED_METRICS, NonFiniteLoss, _use_gpu, run_name, run_training
from helpers import (ROOT, as_logged, make_bundle, process_table, read_curves, session_env, train_config,
                     train_overrides, wait_until)

pytestmark = pytest.mark.usefixtures("ray_session")


def checkpoints(run_folder: Path) -> list[Path]:
    return sorted(p for p in run_folder.glob("checkpoint_*") if p.is_dir()) if run_folder.is_dir() else []


def wait_for_checkpoint(run_folder: Path) -> int:
    """Until Ray Train has registered a checkpoint (its manager's snapshot lists it), not just begun writing it;
    the epoch of the latest registered one."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"

    def latest_epoch() -> int | None:
        try:
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being replaced
            return None

    return wait_until(lambda: checkpoints(run_folder) and latest_epoch(), f"a checkpoint in {run_folder}")


# Two workers, three epochs, on configs/train.yaml (what jobs/train.py reads): the uninterrupted run that the
# data-parallel, same-seed, killed-worker and killed-driver tests compare with, trained once.
REFERENCE = ("train.num_workers=2", "train.epochs=3", "train.keep_checkpoints=1")


def reference_overrides(prepared: Path, work: Path, *extra: str) -> list[str]:
    """The reference run's settings as ``--set`` overrides of configs/train.yaml, with ``extra`` ones that
    change nothing learned (``train.max_failures``)."""
    return train_overrides(prepared, work, *REFERENCE, *extra)


def reference_config(prepared: Path, work: Path, *extra: str):
    return load_config(ROOT / "configs" / "train.yaml", reference_overrides(prepared, work, *extra))


@pytest.fixture(scope="module")
def reference_run(prepared_dir, tmp_path_factory):
    """The reference run, uninterrupted."""
    return run_training(reference_config(prepared_dir, tmp_path_factory.mktemp("reference")))


def test_local_mode_trains_and_exports_a_loadable_bundle(prepared_dir, tmp_path):
    outcome = run_training(train_config(prepared_dir, tmp_path, "train.num_workers=0"))
    assert math.isfinite(outcome.metrics["val_mae"]) and outcome.metrics["epoch"] == 1
    assert outcome.baseline_mae > 0
    bundle = load_bundle(outcome.bundle)
    assert bundle.meta.image_size == 32 and bundle.meta.val_mae == outcome.metrics["val_mae"]
    assert bundle.meta.data.manifest_fingerprint == read_manifest(prepared_dir)["fingerprint"]
    assert set(REPORTED_METRICS) <= set(bundle.meta.metrics)  # every epoch metric reaches the bundle
    with torch.no_grad():
        months = bundle.to_months(bundle.model(torch.rand(2, 1, 32, 32), torch.tensor([0.0, 1.0])))
    assert torch.isfinite(months).all()
    assert outcome.bundle.parent.parent == tmp_path / "registry"
    # every exported bundle carries its trust signals, fitted on the whole val split with the bundle's own answers
    trust, val = bundle.meta.trust, read_manifest(prepared_dir)["splits"]["counts"]["val"]
    assert sum(trust.intervals.counts().values()) == val and trust.val_raw.overall.count == val
    assert trust.val_raw.overall.mae == pytest.approx(outcome.metrics["val_mae"], rel=0.02)  # the same answers
    assert trust.val_calibrated.overall.mae <= trust.val_raw.overall.mae + 0.5


def test_weight_average_is_what_the_checkpoint_and_bundle_keep(prepared_dir, tmp_path):
    """train.ema_epochs: validation scores the average, the bundle holds it, and the checkpoint's training state
    keeps the trained weights for resuming."""
    outcome = run_training(train_config(prepared_dir, tmp_path, "train.num_workers=0", "train.ema_epochs=0.5",
                                        "train.epochs=2"))
    assert math.isfinite(outcome.metrics["val_mae"])
    bundle = load_bundle(outcome.bundle)
    checkpoint = Path(bundle.meta.checkpoint)
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    averaged = torch.load(outcome.bundle / "model.pt", weights_only=True)
    assert state["average_updates"] > 0
    assert averaged.keys() == state["trained_weights"].keys()
    assert not torch.equal(averaged["head.1.weight"], state["trained_weights"]["head.1.weight"])


def test_two_workers_train_data_parallel(prepared_dir, reference_run):
    outcome = reference_run
    assert outcome.final_metrics["epoch"] == 3 and outcome.final_metrics["resumed_at_epoch"] == 0
    # The two workers validated disjoint halves of the val split (an equal split drops at most one row).
    val_rows = read_manifest(prepared_dir)["splits"]["counts"]["val"]
    assert val_rows - 1 <= outcome.final_metrics["val_rows"] <= val_rows
    # Of three checkpoints, Ray Train keeps the best (the bundle's) and, for resuming, the latest.
    kept = checkpoints(Path(outcome.run_path))
    assert 1 <= len(kept) <= 2
    assert str(load_bundle(outcome.bundle).meta.checkpoint) in {str(k) for k in kept}
    # TensorBoard curves in the run's folder: every epoch's reported metrics, the last and the best among them.
    curves = read_curves(Path(outcome.run_path))
    assert set(curves) == set(CURVES) and all(sorted(points) == [1, 2, 3] for points in curves.values())
    assert {tag: curves[tag][3] for tag in CURVES} == {tag: as_logged(outcome.final_metrics[tag]) for tag in CURVES}
    assert curves["val_mae"][outcome.metrics["epoch"]] == as_logged(outcome.metrics["val_mae"])


def test_the_same_seed_trains_the_same_model(prepared_dir, reference_run, tmp_path):
    """Initial weights, batch order (across two workers) and augmentations follow train.seed: reruns and sweep
    trials are comparable."""
    again = run_training(reference_config(prepared_dir, tmp_path)).final_metrics
    first = reference_run.final_metrics
    assert first["train_loss"] == again["train_loss"] and first["val_mae"] == again["val_mae"]


@pytest.mark.slow
def test_compiled_model_trains_data_parallel_and_exports_plain_weights(prepared_dir, tmp_path):
    """train.compile: torch.compile over the DDP-wrapped model; the checkpoint holds the plain module's weights."""
    outcome = run_training(train_config(prepared_dir, tmp_path, "train.num_workers=2", "train.compile=true"))
    assert math.isfinite(outcome.metrics["val_mae"]) and math.isfinite(outcome.metrics["train_loss"])
    bundle = load_bundle(outcome.bundle)  # a strict load: compiled names (_orig_mod.*) would fail it
    with torch.no_grad():
        months = bundle.to_months(bundle.model(torch.rand(2, 1, 32, 32), torch.tensor([0.0, 1.0])))
    assert torch.isfinite(months).all()


def train_worker_pids(session_temp: Path) -> list[int]:
    """PIDs of this session's live Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``), oldest
    first; other sessions' workers on the machine are not ours to kill."""
    return [pid for pid, command in process_table(str(session_temp)) if command.startswith("ray::RayTrainWorker")]


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_last_checkpoint(prepared_dir, reference_run, tmp_path, session_temp):
    """A worker is killed once the epoch-1 checkpoint is registered, with two epochs still to go: the group
    restarts from that checkpoint, not from scratch, and ends where the uninterrupted reference run ends (weights,
    optimizer and schedule restored; batch order and augmentations seeded by epoch)."""
    cfg = reference_config(prepared_dir, tmp_path, "train.max_failures=2")
    run_folder = tmp_path / "runs" / run_name(cfg, read_manifest(prepared_dir))

    def kill_a_worker() -> int:
        epoch = wait_for_checkpoint(run_folder)
        os.kill(train_worker_pids(session_temp)[-1], signal.SIGKILL)  # raises if the run has already ended
        return epoch

    with ThreadPoolExecutor(max_workers=1) as pool:
        killed = pool.submit(kill_a_worker)
        outcome = run_training(cfg)
        checkpointed_at_kill = killed.result(timeout=0)  # the killer's own failure, if any, fails the test
    assert outcome.final_metrics["epoch"] == 3
    # Resumed from the checkpoint registered before the kill (or a later one), before the last epoch.
    assert 1 <= checkpointed_at_kill <= outcome.final_metrics["resumed_at_epoch"] < 3
    assert outcome.final_metrics["val_mae"] == reference_run.final_metrics["val_mae"]  # exactly


@pytest.mark.slow
def test_resubmitting_a_killed_job_resumes_it(prepared_dir, reference_run, tmp_path, ray_session):
    """jobs/train.py killed once its first checkpoint is registered, then submitted again: it resumes and ends
    with the reference run's model."""
    command = [sys.executable, "jobs/train.py", "--config", "configs/train.yaml", "--set",
               *reference_overrides(prepared_dir, tmp_path)]
    env = session_env(ray_session)
    with open(tmp_path / "first.log", "wb") as log:  # a file: a pipe nobody reads could fill and block the driver
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_checkpoint(next_run_folder(tmp_path / "runs"))
        finally:
            first.kill()  # the driver dies mid-run
            first.wait()
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]  # killed, not ended
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "epoch 3/3" in second.stdout and "epoch 1/3" not in second.stdout
    assert second.stdout.strip().splitlines()[-1].startswith("bundle: ")
    resumed = read_meta(second.stdout.strip().splitlines()[-1].removeprefix("bundle: "))
    assert resumed.val_mae == read_meta(reference_run.bundle).val_mae  # exactly: the same seed, the same model


def next_run_folder(runs: Path) -> Path:
    wait_until(lambda: runs.is_dir() and any(runs.iterdir()), f"a run folder under {runs}")
    return next(runs.iterdir())


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(prepared_dir, tmp_path):
    good = train_config(prepared_dir, tmp_path, "train.run_name=nan-run")
    run_training(good)  # epoch 1 on good data: a checkpoint
    kept = checkpoints(tmp_path / "runs" / "nan-run")
    assert len(kept) == 1

    poisoned = tmp_path / "poisoned"
    split_path(poisoned, "train").mkdir(parents=True)
    split_path(poisoned, "val").symlink_to(split_path(prepared_dir, "val"))
    (poisoned / MANIFEST).symlink_to(prepared_dir / MANIFEST)
    for part in split_path(prepared_dir, "train").glob("*.parquet"):
        table = pq.read_table(part)
        nan = pa.array([float("nan")] * len(table), pa.float64())
        pq.write_table(table.set_column(table.schema.get_field_index("boneage"), "boneage", nan),
                       split_path(poisoned, "train") / part.name)
    with pytest.raises(NonFiniteLoss, match=r"NaN or infinite in epoch 2.*Last good checkpoint: .*checkpoint_"):
        run_training(train_config(poisoned, tmp_path, "train.run_name=nan-run", "train.epochs=2"))
    assert checkpoints(tmp_path / "runs" / "nan-run") == kept
    assert pc.all(pc.is_finite(pq.read_table(split_path(prepared_dir, "train"))["boneage"])).as_py()


@pytest.mark.parametrize("standing_mae, promoted", [(1e6, True), (1e-3, False)])
def test_the_train_job_promotes_its_model_to_best_only_when_it_is_better(prepared_dir, tmp_path, capsys,
                                                                         standing_mae, promoted):
    """jobs/train.py against a registry whose ``best`` is a version scored on the same val split: the new version
    becomes ``best`` when its val MAE beats the standing one's, else ``best`` stays."""
    cfg = train_config(prepared_dir, tmp_path, "train.num_workers=0")
    root, name = tmp_path / "registry", cfg.registry.name
    data = read_manifest(prepared_dir)["fingerprint"]
    standing = register(make_bundle(tmp_path / "standing", val_mae=standing_mae, data=data, size=32)[0], root, name)
    assert promote_if_better(standing, root, name).promoted
    job = runpy.run_path(str(ROOT / "jobs" / "train.py"), run_name="imported")
    job["main"](["--config", str(save_config(cfg, tmp_path / "train.yaml"))])
    bundle = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("bundle: "))
    assert bundle == root / name / "2"
    assert read_best(root, name)["version"] == (2 if promoted else 1)


def test_preview_job_writes_a_grid_of_training_images_without_ray_train(prepared_dir, tmp_path):
    from PIL import Image

    png = tmp_path / "p.png"
    job = [str(ROOT / "jobs" / "preview_augment.py"), "--set", f"data.out={prepared_dir}",
           "augment.preview_images=4", "--out", str(png)]
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('imported ray.train' if 'ray.train' in sys.modules else 'no ray.train')")
    out = subprocess.run([sys.executable, "-c", code, *job], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ours = [line for line in out.stdout.splitlines() if "(raylet)" not in line]  # Ray's own warnings forwarded
    assert ours[-2:] == [f"preview: {png}", "no ray.train"]  # joined the session's Ray only
    assert Image.open(png).size == (2 + 4 * 34, 2 + 4 * 34)


def test_a_finished_run_resubmitted_is_not_trained_or_registered_again(prepared_dir, tmp_path, caplog):
    cfg = train_config(prepared_dir, tmp_path)
    first = run_training(cfg)
    name, models = run_name(cfg, read_manifest(prepared_dir)), tmp_path / "registry" / "boneage-vgg16"
    caplog.set_level(logging.INFO, logger="boneage")
    again = run_training(cfg)
    # The only line: no "training run ..." line, no promotion.
    assert [r.getMessage() for r in caplog.records] == [f"already trained: {name}, bundle boneage-vgg16:1"]
    assert again.bundle == first.bundle and again.metrics == first.metrics
    assert versions(models.parent, models.name) == [1]

    # Its bundle deleted meanwhile: exported again from the run's best checkpoint (same weights), not trained.
    weights = torch.load(first.bundle / "model.pt", weights_only=True)
    shutil.rmtree(first.bundle)
    caplog.clear()
    third = run_training(cfg)
    *fitted, exported, promotion = (r.getMessage() for r in caplog.records)
    # the bundle exported again gets its trust signals and its out-of-distribution detector
    assert any(message.startswith("bias correction: val MAE") for message in fitted)
    assert fitted[-1].startswith("out-of-distribution detector: threshold")
    assert exported.startswith(f"already trained: {name}, bundle boneage-vgg16:1 (exported again from the run's "
                               f"best checkpoint {first.run_path}/checkpoint_")
    assert promotion == f"version 1 is already boneage-vgg16:best (val MAE {first.metrics['val_mae']:.2f})"
    exported_weights = load_bundle(third.bundle).model.state_dict()
    assert all(torch.equal(exported_weights[key], value) for key, value in weights.items())


def test_training_prints_its_precision_and_progress_within_an_epoch(prepared_dir, tmp_path, capfd):
    from boneage.precision import describe

    run_training(train_config(prepared_dir, tmp_path, "train.num_workers=0", "train.progress_seconds=0.01"))
    out = capfd.readouterr().out
    assert describe(torch.device("cpu"), "auto", "train") in out
    progress = re.findall(r"^epoch 1/1: (\d+)/(\d+) images, [\d.]+ img/s, about \d+ s left in the epoch$", out,
                          re.MULTILINE)
    assert progress, out
    assert all(int(done) <= int(total) for done, total in progress)


def test_use_gpu_asks_the_connected_cluster_and_never_connects():
    auto = load_config(overrides=["train.use_gpu=auto"])
    assert _use_gpu(auto) == (ray.cluster_resources().get("GPU", 0) > 0)  # this session's cluster
    # A process not yet connected: the settings true/false answer without Ray; auto refuses instead of starting or
    # joining a cluster (RAY_ADDRESS names this session's, so a ray.init() would join it).
    code = ("import ray; from boneage.config import load_config; from boneage.train import _use_gpu\n"
            "answers = [_use_gpu(load_config(overrides=[f'train.use_gpu={v}'])) for v in ('true', 'false')]\n"
            "try:\n    _use_gpu(load_config(overrides=['train.use_gpu=auto']))\n"
            "except RuntimeError as err:\n    answers.append(str(err))\n"
            "print(answers, ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("[True, False, 'train.use_gpu=auto asks the Ray cluster whether it has a GPU: "
                                  "connect first'] False")

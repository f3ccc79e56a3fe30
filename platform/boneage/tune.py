"""Hyperparameter sweeps with Ray Tune over the training job, early stopping with ASHA, and promotion of the best.

The Train V2 pattern: every Tune trial is a small driver that builds and fits the same ``TorchTrainer`` as
``jobs/train.py`` (:func:`boneage.train.make_trainer`), its Train run named after the trial, and Tune hears the
epoch metrics through ``TuneReportCallback``. There is no second training loop. Each trial's Train run writes its
own TensorBoard curves, as every training run does.

The search space is YAML under ``tune.search_space``, keyed by config key (the settings with
``Role.SEARCHABLE``, :func:`boneage.config.keys_with`); ``randint: [low, high]`` includes both ends::

    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
    model.head: {choice: [[256], [512, 128], [1024, 256]]}

Tune records each trial's draws beside the sweep's whole config (:func:`trial_space`): the trial trains with the
config :func:`trial_config` makes of that record, and its bundle states the same one.

Everything is checked before any trial starts: the space, the metric, and that one trial fits the cluster. The
sweep name is derived from its settings, so rerunning the same command after an interruption resumes the sweep
and does not rerun finished trials.

The best trial's best checkpoint is exported (with its trust signals and out-of-distribution detector) and
promoted if it beats ``best``; with ``tune.ensemble_size`` above 1 the best trials are exported as one ensemble
bundle instead (:mod:`boneage.ensemble`). That setting is not part of the sweep's name: rerunning a finished sweep
with it only re-exports.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.state import list_actors

from boneage.artifacts import atomic_file
from boneage.bundle import promote_if_better, staging_folder
from boneage.cluster import connect_to_ray
from boneage.config import Config, ConfigError, Role, config_from_dict, derived_name, keys_with, to_dict, with_overrides
from boneage.dataset import read_manifest
from boneage.ensemble import export_ensemble
from boneage.errors import JobError
from boneage.train import (REPORTED_METRICS, RunPlan, export_bundle, make_trainer, plan_run, write_checkpoint_bundle,
                           storage_path, waiting_for_workers)

log = logging.getLogger(__name__)

BASE = "base"  # the entry of a trial's Tune config that holds the sweep's whole config (trial_space)
DISTRIBUTIONS = {"choice": tune.choice, "uniform": tune.uniform, "loguniform": tune.loguniform,
                 "randint": tune.randint}


TRIAL_DRIVER_MEMORY = 64 << 20  # bytes: what a trial asks for itself (its Train run asks for the CPUs)
# A trial's driver sits in a blocking call to its Train run and never sees Tune's polite stop. Tune's default is to
# wait 600 s before killing it, while the Train run goes on training and holding its CPUs. Kill it after a few
# seconds instead: the Train controller it owns dies with it and Ray Train releases the workers' resources.
STOPPED_TRIAL_GRACE_S = "5"
# Each trial's Train run writes its TensorBoard curves (boneage.curves); Tune would add its own TensorBoard logger
# and draw them again under other names. Its CSV and JSON loggers stay: the leaderboard reads their histories.
TUNE_LOGGERS = (CSVLoggerCallback, JsonLoggerCallback)


class SweepError(JobError, ValueError):
    """A sweep that cannot start; the message says what to change."""


@dataclass
class SweepOutcome:
    """What a finished sweep produced."""

    leaderboard: Path  # the CSV; the Markdown table sits beside it
    table: pd.DataFrame
    bundle: Path | None  # the best trial's best checkpoint (or the best trials' ensemble) as a registered bundle
    # (None if every trial failed)
    promoted: bool
    promotion: str  # why best moved or stayed


def parse_search_space(space: dict[str, Any], base: Config) -> dict[str, Any]:
    """The YAML search space as Tune distributions, after checking every key, distribution and value."""
    if not space:
        raise SweepError("tune.search_space is empty: give at least one setting to search, e.g. "
                         "tune.search_space={train.lr: {loguniform: [1.0e-4, 3.0e-3]}}; searchable: "
                         + ", ".join(keys_with(Role.SEARCHABLE)))
    return {key: _parse_distribution(key, spec, base) for key, spec in space.items()}


def _parse_distribution(key: str, spec: Any, base: Config) -> Any:
    if key not in keys_with(Role.SEARCHABLE):
        raise SweepError(f"tune.search_space: {key!r} cannot be searched; searchable: "
                         + ", ".join(keys_with(Role.SEARCHABLE)))
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise SweepError(f"tune.search_space.{key} must be one of {{choice: [...]}}, {{uniform: [low, high]}}, "
                         f"{{loguniform: [low, high]}}, {{randint: [low, high]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SweepError(f"tune.search_space.{key}.{kind} needs a non-empty list, got {values!r}")
    if kind == "choice":
        candidates = values
    else:
        try:
            low, high = (float(v) for v in values)
        except (TypeError, ValueError):
            raise SweepError(f"tune.search_space.{key}.{kind} needs [low, high] numbers, got {values!r}") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            raise SweepError(f"tune.search_space.{key}.{kind}: need low < high{' and low > 0' * (kind == 'loguniform')}"
                             f", got {values!r}")
        if kind == "randint" and not (low.is_integer() and high.is_integer()):
            raise SweepError(f"tune.search_space.{key}.randint needs whole numbers [low, high], got {values!r}")
        candidates = [int(low), int(high)] if kind == "randint" else [low, high]
    for value in candidates:  # every value must be one the config system accepts
        try:
            with_overrides(base, {key: value})
        except ConfigError as err:
            raise SweepError(f"tune.search_space.{key}: {err}") from None
    if kind == "randint":  # the YAML's [low, high] includes both ends; Tune's randint excludes its upper bound
        return tune.randint(candidates[0], candidates[1] + 1)
    return DISTRIBUTIONS[kind](candidates) if kind == "choice" else DISTRIBUTIONS[kind](*candidates)


def trial_space(cfg: Config, space: dict[str, Any]) -> dict[str, Any]:
    """Tune's param space: the searched settings' distributions, keyed ``area.key`` in the YAML's order (which
    fixes what a seed draws), and under :data:`BASE` the sweep's whole config, its trials training
    ``tune.max_epochs`` epochs. Tune records it, resolved, with each trial."""
    return {**space, BASE: to_dict(with_overrides(cfg, {"train.epochs": cfg.tune.max_epochs}))}


def trial_config(resolved: dict[str, Any]) -> Config:
    """The config one trial trains with, from its resolved :func:`trial_space` as Tune recorded it."""
    draws = {key: value for key, value in resolved.items() if key != BASE}
    return with_overrides(config_from_dict(resolved[BASE]), draws)


def check_metric(metric: str) -> None:
    if metric not in REPORTED_METRICS:
        raise SweepError(f"tune.metric={metric!r} is never reported by training; it reports: "
                         + ", ".join(REPORTED_METRICS))


def check_state_api() -> None:
    """Ray Train frees a stopped trial's workers through Ray's State API: without it (no dashboard, or two Ray
    clusters on one machine, which its auto-discovery cannot tell apart) a sweep would hang on their CPUs."""
    try:
        list_actors(limit=1, raise_on_missing_output=False)
    except Exception as err:  # the State API raises several types
        raise SweepError(f"Ray's State API is not reachable ({type(err).__name__}: {err}). Sweeps need it: start "
                         "Ray with its dashboard (the default with ray[default]; not include_dashboard=False) and "
                         "run one Ray cluster per machine") from None


def trial_concurrency(cfg: Config, cluster: dict[str, float]) -> int:
    """How many trials run at once: as many as the cluster's CPUs and GPUs hold beside ``tune.data_cpus`` for
    Ray Data; fails when not even one fits."""
    tc = cfg.train
    workers = max(1, tc.num_workers)
    need_cpus = workers * tc.cpus_per_worker
    free_cpus = cluster.get("CPU", 0.0) - cfg.tune.data_cpus
    gpus = workers if tc.use_gpu is True or (tc.use_gpu == "auto" and cluster.get("GPU", 0) > 0) else 0
    if need_cpus > free_cpus or gpus > cluster.get("GPU", 0.0):
        raise SweepError(
            f"one trial needs {need_cpus:g} CPUs{f' and {gpus} GPUs' if gpus else ''} (train.num_workers x "
            f"train.cpus_per_worker) but the cluster has {cluster.get('CPU', 0):g} CPUs and "
            f"{cluster.get('GPU', 0):g} GPUs, of which tune.data_cpus={cfg.tune.data_cpus:g} CPUs stay free for "
            "Ray Data: lower train.num_workers or train.cpus_per_worker, or add nodes")
    by_cpu = math.floor(free_cpus / need_cpus) if need_cpus else cfg.tune.num_samples
    by_gpu = math.floor(cluster.get("GPU", 0.0) / gpus) if gpus else by_cpu
    return max(1, min(by_cpu, by_gpu, cfg.tune.num_samples))


def sweep_name(cfg: Config, manifest: dict[str, Any]) -> str:
    """The derived name of a sweep on the prepared dataset ``manifest`` describes: rerunning the same sweep resumes
    it (:func:`boneage.config.derived_name`)."""
    return derived_name(cfg, manifest["fingerprint"], sweep=True)


def run_trial(resolved: dict[str, Any], plan: RunPlan, sweep: str, storage: str) -> None:
    """One Tune trial: the training job with the trial's config, its Train run named after the trial."""
    cfg = trial_config(resolved)
    name = f"{sweep}-{tune.get_context().get_trial_id()}"
    make_trainer(cfg, plan.loop_config(cfg), plan.datasets, name, storage, callbacks=[TuneReportCallback()]).fit()


def run_sweep(cfg: Config) -> SweepOutcome:
    """Run (or resume) the sweep, write the leaderboard, export the best trial and promote it if it is better."""
    space = parse_search_space(cfg.tune.search_space, cfg)
    check_metric(cfg.tune.metric)
    read_manifest(cfg.data.out)  # an unprepared data.out fails here, before Ray starts
    connect_to_ray()
    check_state_api()
    concurrency = trial_concurrency(cfg, ray.cluster_resources())
    plan = plan_run(cfg)
    name = cfg.tune.sweep_name or sweep_name(cfg, plan.manifest)
    storage = storage_path(cfg.train.storage_path)
    # A trial only waits on its Train run, whose workers hold the CPUs. Tune refuses an empty request, so the
    # trial asks for no CPU and a token of memory.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, sweep=name, storage=storage),
        {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    path = f"{storage}/{name}"
    if tune.Tuner.can_restore(path):
        log.info("resuming sweep %s: finished trials are kept", name)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        log.info("sweep %s: %d trials, up to %d at a time, %d epochs at most, baseline val MAE %.2f", name,
                 cfg.tune.num_samples, concurrency, cfg.tune.max_epochs, plan.baseline_mae)
        tuner = tune.Tuner(trainable, param_space=trial_space(cfg, space),
                           tune_config=_tune_config(cfg, concurrency),
                           run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                                     callbacks=[logger() for logger in TUNE_LOGGERS]))
    # Both read when the sweep starts; a restored sweep keeps the callbacks it was created with.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", STOPPED_TRIAL_GRACE_S)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # only TUNE_LOGGERS, no second TensorBoard writer
    log.info("each trial: %s", waiting_for_workers(cfg))
    results = tuner.fit()
    table = leaderboard(results, list(space), cfg)
    board = write_leaderboard(table, Path(path) if "://" not in path else Path(cfg.registry.root) / name)
    bundle = export_best(results, cfg, plan, name)
    if bundle is None:
        return SweepOutcome(board, table, None, False, "every trial failed: nothing to export; best stays")
    promotion = promote_if_better(bundle, cfg.registry.root, cfg.registry.name)
    return SweepOutcome(board, table, bundle, promotion.promoted, promotion.message)


def _tune_config(cfg: Config, concurrency: int) -> tune.TuneConfig:
    t = cfg.tune
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=t.max_epochs, grace_period=t.grace_period,
                               reduction_factor=t.reduction_factor) if t.scheduler == "asha" else FIFOScheduler())
    return tune.TuneConfig(metric=t.metric, mode="min", scheduler=scheduler, num_samples=t.num_samples,
                           search_alg=BasicVariantGenerator(max_concurrent=concurrency, random_state=t.seed),
                           trial_dirname_creator=_trial_folder)


def _trial_folder(trial) -> str:
    return f"trial-{trial.trial_id}"


def leaderboard(results: tune.ResultGrid, keys: list[str], cfg: Config) -> pd.DataFrame:
    """One row per trial: its settings, epochs run, best metric, how it ended, the metric by epoch, wall time; best
    first."""
    rows = []
    for result in results:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        epochs = int(history["epoch"].max()) if "epoch" in history else 0
        best = float(history[cfg.tune.metric].min()) if cfg.tune.metric in history else math.nan
        if result.error is not None:
            status = "failed"
        elif epochs < cfg.tune.max_epochs:
            status = "stopped early (ASHA)"
        else:
            status = "completed"
        rows.append({"trial": Path(result.path).name.removeprefix("trial-"), **{k: result.config.get(k) for k in keys},
                     "epochs": epochs, f"best_{cfg.tune.metric}": best, "status": status,
                     # the metric epoch by epoch: why ASHA stopped a trial, or where a completed one peaked
                     cfg.tune.metric: " ".join(f"{v:.1f}" for v in history.get(cfg.tune.metric, [])),
                     "wall_seconds": float(history["time_total_s"].max()) if "time_total_s" in history else 0.0,
                     "error": "" if result.error is None else str(result.error).splitlines()[0][:200]})
    return pd.DataFrame(rows).sort_values(f"best_{cfg.tune.metric}", na_position="last").reset_index(drop=True)


def write_leaderboard(table: pd.DataFrame, folder: Path) -> Path:
    """``leaderboard.csv`` and ``leaderboard.md`` in ``folder``; returns the CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / "leaderboard.csv") as tmp:
        table.to_csv(tmp, index=False)
    shown = table.drop(columns="error")
    # Text columns stay text: tabulate would read a trial id such as 09960_00001 as a number (Python's float()
    # allows underscores) and a one-epoch val MAE history as a float.
    text_columns = [i for i, column in enumerate(shown.columns) if not pd.api.types.is_numeric_dtype(shown[column])]
    with atomic_file(folder / "leaderboard.md") as tmp:
        tmp.write_text(shown.to_markdown(index=False, floatfmt=".4g", disable_numparse=text_columns) + "\n")
    return folder / "leaderboard.csv"


def export_best(results: Iterable[tune.Result], cfg: Config, plan: RunPlan, sweep: str) -> Path | None:
    """Register the best trial's best checkpoint, or the ``tune.ensemble_size`` best trials as one ensemble bundle;
    None when no trial left a checkpoint."""
    metric = cfg.tune.metric
    ok = sorted((r for r in results if r.error is None and r.metrics_dataframe is not None
                 and CHECKPOINT_PATH_KEY in r.metrics_dataframe), key=lambda r: r.metrics_dataframe[metric].min())
    if not ok:
        return None
    best = [_trial_best(result, metric, sweep) for result in ok[:cfg.tune.ensemble_size]]
    if len(best) > 1:
        return _export_ensemble(best, cfg, plan)
    return export_bundle(best[0].checkpoint, best[0].cfg, plan, best[0].metrics, best[0].run)


@dataclass
class TrialBest:
    """A trial's best checkpoint, with what it reported there and the settings it trained with."""

    checkpoint: Checkpoint
    metrics: dict[str, Any]
    cfg: Config
    run: str  # <sweep>-<trial id>


def _trial_best(result: tune.Result, metric: str, sweep: str) -> TrialBest:
    history = result.metrics_dataframe.dropna(subset=[CHECKPOINT_PATH_KEY])
    row = history.loc[history[metric].idxmin()]
    # trial_config: what the trial trained with, from Tune's record of it
    return TrialBest(Checkpoint(row[CHECKPOINT_PATH_KEY]), {k: row[k] for k in REPORTED_METRICS if k in row},
                     trial_config(result.config), f"{sweep}-{Path(result.path).name.removeprefix('trial-')}")


def _export_ensemble(trials: list[TrialBest], cfg: Config, plan: RunPlan) -> Path:
    """The trials' best checkpoints, staged as bundles, exported as one registered ensemble (best first)."""
    with staging_folder() as staging:
        members = [write_checkpoint_bundle(t.checkpoint, t.cfg, plan, t.metrics, t.run, staging / f"m{i}")
                   for i, t in enumerate(trials)]
        log.info("exporting the %d best trials as one ensemble", len(members))
        return export_ensemble(members, cfg.data.out, cfg.registry.root, cfg.registry.name)

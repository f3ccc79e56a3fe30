"""Data-parallel training with Ray Train (V2): the loop each worker runs, and the driver that launches it.

Each worker streams its shard of the prepared Parquet (``get_dataset_shard`` + ``iter_torch_batches`` with
prefetching), decodes nothing (images are raw uint8), augments on its device with Kornia, and trains a DDP-wrapped
:class:`~boneage.model.BoneAgeNet` with AdamW, warm-up + cosine learning rate, L1 loss on the standardised
target and gradient clipping; channels_last, and bf16 autocast where it is faster (:mod:`boneage.precision`).
Nothing in the step loop waits on the device: losses and errors accumulate as device tensors, summed across workers
once per epoch, and the progress lines within an epoch count on the host.

Every epoch reports train loss, val MAE / RMSE in months, images/s per worker and the learning rate, with a
checkpoint from rank 0; Ray Train keeps the best by val MAE. A killed worker restarts the group from the last
checkpoint (``train.max_failures``); the run name is derived from the settings, so submitting the same job again
resumes it. A non-finite loss ends the run with :class:`NonFiniteLoss`, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from boneage.artifacts import atomic_directory
from boneage.augment import write_preview
from boneage.bundle import promote_if_better, reference, register, write_bundle
from boneage.config import Config, config_from_dict, derived_name, settings_fingerprint, to_dict
from boneage.curves import TensorBoardCurves
from boneage.dataset import batch_tensors, read_manifest, read_split
from boneage.engine import EpochProgress, TrainStep, evaluate, synchronize
from boneage.errors import JobError
from boneage.model import NUM_BLOCKS, build_model
from boneage.precision import describe

log = logging.getLogger(__name__)

METRIC = "val_mae"
# What every epoch reports (the metrics a sweep can optimise).
REPORTED_METRICS = ("val_mae", "val_rmse", "train_loss", "epoch", "images_per_s_per_worker", "lr", "epoch_seconds",
                    "resumed_at_epoch", "val_rows")
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


class NonFiniteLoss(JobError, RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    bundle: Path  # the best checkpoint, registered as a model bundle
    metrics: dict[str, Any]  # the best epoch's metrics
    final_metrics: dict[str, Any]  # the last epoch's metrics
    baseline_mae: float  # val MAE of always predicting the training mean
    run_path: str


class RunFilesGone(JobError, FileNotFoundError):
    """A finished run whose bundle and best checkpoint were both deleted: nothing is left to answer with."""


@dataclass
class FinishedRun:
    """The record a run leaves in its folder once its bundle is registered: a resubmitted job finds it and
    answers with the bundle instead of training (or registering) again."""

    FILE: ClassVar[str] = "finished_run.json"

    run: str
    learned: str  # learned_fingerprint of the run's settings
    run_path: str
    checkpoint: str  # the best checkpoint, to export again if the bundle is deleted
    bundle: str  # the registered version folder
    metrics: dict[str, float]  # the best epoch's
    final_metrics: dict[str, float]  # the last epoch's
    baseline_mae: float

    def save(self, storage: str) -> None:
        """Write the record into the run's folder (atomically: a rename, or one object on a URI)."""
        fs, folder = pyarrow.fs.FileSystem.from_uri(f"{storage}/{self.run}")
        with fs.open_output_stream(f"{folder}/.{self.FILE}.tmp") as out:
            out.write(json.dumps(dataclasses.asdict(self), indent=2).encode())
        fs.move(f"{folder}/.{self.FILE}.tmp", f"{folder}/{self.FILE}")

    @classmethod
    def load(cls, storage: str, run: str) -> FinishedRun | None:
        """The record of run ``run``, or None when it has not finished."""
        fs, folder = pyarrow.fs.FileSystem.from_uri(f"{storage}/{run}")
        if fs.get_file_info(f"{folder}/{cls.FILE}").type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(f"{folder}/{cls.FILE}") as handle:
            return cls(**json.loads(handle.read()))

    def outcome(self) -> TrainOutcome:
        return TrainOutcome(bundle=Path(self.bundle), metrics=self.metrics, final_metrics=self.final_metrics,
                            baseline_mae=self.baseline_mae, run_path=self.run_path)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict (Ray Train adds a few others), as JSON can keep them."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class BoneAgeCollate(NumpyBatchCollateFn):
    """A Ray Data batch -> tensors: image (B, 1, S, S) uint8, boneage (B,) float32 months, male (B,) float32."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return batch_tensors(batch, self.image_size)


# ---------------------------------------------------------------- the worker side

def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function. Returns (from rank 0) how the run ended."""
    cfg = config_from_dict(loop_config["config"])
    tc = cfg.train
    # Ray Train logs every report at INFO through a logger named after its source file, which sits outside
    # "ray.train" and so escapes LoggingConfig: quiet the worker's root logger. The epoch lines are ours to print.
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, tc.threads_per_worker or round(tc.cpus_per_worker)))
    image_size, mean, std = loop_config["image_size"], loop_config["target_mean"], loop_config["target_std"]

    torch.manual_seed(tc.seed)  # the same initial weights for the same seed: reruns and sweep trials comparable
    net = build_model(cfg.model, image_size).to(memory_format=torch.channels_last)
    freezing = tc.freeze_epochs > 0 or tc.unfreeze_blocks < NUM_BLOCKS
    model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": freezing})
    if tc.compile:
        model = torch.compile(model)  # the DDP wrapper too: its optimizer splits graphs at gradient buckets
    steps_per_epoch = max(1, loop_config["train_rows"] // world // tc.batch_size)
    step = TrainStep(model, net, cfg, steps_per_epoch, mean, std, device)
    start_epoch = restore(ray.train.get_checkpoint(), step)
    collate = BoneAgeCollate(image_size)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    nodes = _count_nodes()
    if rank == 0:
        print(f"training on {world} worker(s) across {nodes} node(s), from epoch {start_epoch + 1}; "
              f"{describe(device, tc.precision, 'train')}", flush=True)

    for epoch in range(start_epoch, tc.epochs):
        torch.manual_seed(tc.seed * 100_003 + epoch * 1_009 + rank)  # augmentations repeat after a restart
        started = time.perf_counter()
        step.start_epoch(epoch)
        progress = EpochProgress(epoch + 1, tc.epochs, steps_per_epoch * tc.batch_size * world, world,
                                 tc.progress_seconds)
        train_epoch(step, train_shard, cfg, epoch, collate, device, progress, rank == 0)
        synchronize(device)  # once per epoch, for an honest images/s
        train_seconds = time.perf_counter() - started
        step.recalibrate_batchnorm()
        val = evaluate(step.eval_model, val_shard.iter_torch_batches(batch_size=2 * tc.batch_size, collate_fn=collate),
                       mean, std, device, tc.precision)
        metrics = epoch_metrics(step, val, epoch, started, train_seconds, start_epoch)
        if not (math.isfinite(metrics["train_loss"]) and math.isfinite(metrics[METRIC])):
            ray.train.report({**metrics, "nonfinite_loss": 1})  # no checkpoint: the last good one stays best
            return {"stopped": "nonfinite_loss", "epoch": epoch + 1}
        if rank == 0:
            print(format_epoch(metrics, tc.epochs), flush=True)
        report_with_checkpoint(metrics, step, rank, loop_config["local_checkpoint"])
    return {"stopped": "completed", "epoch": tc.epochs}


def train_epoch(step: TrainStep, shard, cfg: Config, epoch: int, collate: BoneAgeCollate, device: torch.device,
                progress: EpochProgress, prints: bool) -> None:
    """One pass of the training step over this worker's shard; progress lines when ``prints`` (rank 0)."""
    tc = cfg.train
    for batch in shard.iter_torch_batches(
            batch_size=tc.batch_size, prefetch_batches=tc.prefetch_batches, collate_fn=collate,
            drop_last=True, local_shuffle_buffer_size=tc.shuffle_buffer or None,
            local_shuffle_seed=tc.seed + epoch, pin_memory=device.type == "cuda"):
        step(batch)
        line = progress.advance(tc.batch_size)
        if line and prints:
            print(line, flush=True)


def epoch_metrics(step: TrainStep, val: list[torch.Tensor], epoch: int, started: float, train_seconds: float,
                  start_epoch: int) -> dict[str, Any]:
    """The epoch's reported metrics, its sums taken over all workers (the epoch's one host sync); ``started``
    is the epoch's start on the ``time.perf_counter`` clock."""
    device = step.loss_sum.device
    totals = _sum_over_workers(torch.stack([step.loss_sum, torch.tensor(float(step.seen), device=device), *val]))
    return {
        "epoch": epoch + 1, "train_loss": totals[0] / max(totals[1], 1.0),
        METRIC: totals[2] / max(totals[4], 1.0), "val_rmse": math.sqrt(totals[3] / max(totals[4], 1.0)),
        "images_per_s_per_worker": step.seen / max(train_seconds, 1e-9),
        "lr": step.optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - started,
        "resumed_at_epoch": start_epoch, "val_rows": int(totals[4]),
    }


def restore(checkpoint: Checkpoint | None, step: TrainStep) -> int:
    """Load a checkpoint's weights and optimizer state; return the epoch to start from (0 without one).

    Every worker loads the same checkpoint, so DDP replicas stay identical."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        weights = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=True)
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    step.eval_net.load_state_dict(weights)
    step.load_state_dict(state)
    return int(state["epoch"])


def report_with_checkpoint(metrics: dict[str, Any], step: TrainStep, rank: int,
                           local_folder: str | None) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (weights, optimizer, scheduler, epoch).

    In local mode (no workers) Ray Train persists no checkpoints, so the checkpoint is written straight to
    ``local_folder`` (replaced atomically each epoch) and reported from there."""
    if local_folder:
        with atomic_directory(local_folder) as folder:
            save_checkpoint(Path(folder), metrics["epoch"], step)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(local_folder))
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(Path(folder), metrics["epoch"], step)
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def save_checkpoint(folder: Path, epoch: int, step: TrainStep) -> None:
    """The validated weights (the bundle's), and the training state."""
    torch.save(step.eval_net.state_dict(), folder / MODEL_FILE)
    torch.save({**step.state_dict(), "epoch": epoch}, folder / STATE_FILE)


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    """One readable progress line."""
    return (f"epoch {metrics['epoch']}/{epochs}  train_loss {metrics['train_loss']:.3f}  "
            f"val_mae {metrics[METRIC]:.2f} mo  val_rmse {metrics['val_rmse']:.2f} mo  lr {metrics['lr']:.2e}  "
            f"{metrics['images_per_s_per_worker']:.0f} img/s/worker  {metrics['epoch_seconds']:.0f} s")


def _distributed() -> bool:
    """Whether workers share a process group (not in local mode or with one worker)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _count_nodes() -> int:
    """How many distinct nodes the workers run on."""
    if not _distributed():
        return 1
    nodes: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return len(set(nodes))


def _sum_over_workers(values: torch.Tensor) -> list[float]:
    if _distributed():
        torch.distributed.all_reduce(values)
    return values.tolist()  # the epoch's one host sync


# ---------------------------------------------------------------- the driver side

@dataclass
class RunPlan:
    """What every run on a prepared dataset shares: its manifest, the Ray Datasets, the baseline to beat."""

    manifest: dict[str, Any]
    datasets: dict[str, ray.data.Dataset]
    baseline_mae: float  # val MAE of always answering the training mean

    def loop_config(self, cfg: Config) -> dict[str, Any]:
        """The per-worker function's config for a run with settings ``cfg``."""
        train_stats = self.manifest["label_statistics"]["train"]
        return {"config": to_dict(cfg), "image_size": self.manifest["image_size"],
                "target_mean": train_stats["boneage_mean"], "target_std": train_stats["boneage_std"],
                "train_rows": self.manifest["splits"]["counts"]["train"], "local_checkpoint": None}


def plan_run(cfg: Config) -> RunPlan:
    """Read the prepared dataset's manifest and splits (cached in the object store when asked)."""
    log.info("reading the prepared dataset %s (connecting to Ray first) ...", cfg.data.out)
    manifest = read_manifest(cfg.data.out)
    datasets = {split: read_split(cfg.data.out, split) for split in ("train", "val")}
    if cfg.train.cache_dataset:  # read Parquet once; each epoch then streams from the object store
        log.info("loading the train and val splits into Ray's object store ...")
        datasets = {split: dataset.materialize() for split, dataset in datasets.items()}
    log.info("computing the predict-the-mean baseline on the val split ...")
    baseline = mean_baseline_mae(datasets["val"], manifest["label_statistics"]["train"]["boneage_mean"])
    return RunPlan(manifest=manifest, datasets=datasets, baseline_mae=baseline)


def run_training(cfg: Config) -> TrainOutcome:
    """Train on ``cfg.data.out`` with Ray Train, register the best checkpoint as a model bundle, and promote it
    to the registry's ``best`` alias if it beats the current best on the same validation split. A run that
    already finished (the same settings) is not trained again: its bundle is returned."""
    manifest = read_manifest(cfg.data.out)
    learned, name = learned_fingerprint(cfg, manifest), cfg.train.run_name or run_name(cfg, manifest)
    storage = storage_path(cfg.train.storage_path)
    finished = FinishedRun.load(storage, name)
    if finished is not None and finished.learned == learned:  # a reused train.run_name with other settings trains
        return already_trained(finished, cfg)
    plan = plan_run(cfg)
    loop_config = plan.loop_config(cfg)
    if cfg.train.num_workers == 0:  # local mode: debugging in this process; it keeps only its last checkpoint
        if "://" in storage:
            raise ValueError("train.num_workers=0 (local mode) keeps its checkpoint in a local folder; set "
                             "train.storage_path to a local path")
        loop_config["local_checkpoint"] = str(Path(storage) / name / "local-checkpoint")
    counts = plan.manifest["splits"]["counts"]
    log.info("training run %s: %d train / %d val images at %d px; predict-the-mean val MAE %.2f months", name,
             counts["train"], counts["val"], loop_config["image_size"], plan.baseline_mae)
    log.info("%s", waiting_for_workers(cfg))
    result = make_trainer(cfg, loop_config, plan.datasets, name, storage).fit()
    best, metrics = best_checkpoint(result, name)
    bundle = export_bundle(best, cfg, plan, metrics, name)
    log.info("%s", promote_if_better(bundle, cfg.registry.root, cfg.registry.name).message)
    finished = FinishedRun(run=name, learned=learned, run_path=result.path, checkpoint=best.path,
                           bundle=str(bundle), metrics=_numbers(metrics), final_metrics=_numbers(result.metrics),
                           baseline_mae=plan.baseline_mae)
    finished.save(storage)
    return finished.outcome()


def already_trained(finished: FinishedRun, cfg: Config) -> TrainOutcome:
    """The outcome of a run that finished before. Its bundle is re-exported from the run's best checkpoint when
    it is no longer in ``cfg``'s registry (deleted, or another registry asked for)."""
    bundle = Path(finished.bundle)
    if bundle.resolve().parent == (Path(cfg.registry.root) / cfg.registry.name).resolve() and bundle.is_dir():
        log.info("already trained: %s, bundle %s", finished.run, reference(bundle))
        return finished.outcome()
    if not Path(finished.checkpoint).is_dir():
        raise RunFilesGone(f"run {finished.run} finished, but its bundle {bundle} and its best checkpoint "
                       f"{finished.checkpoint} are gone: delete {finished.run_path} to train it again")
    manifest = read_manifest(cfg.data.out)
    plan = RunPlan(manifest=manifest, datasets={}, baseline_mae=finished.baseline_mae)  # export needs no rows
    finished.bundle = str(export_bundle(Checkpoint(finished.checkpoint), cfg, plan, finished.metrics, finished.run))
    log.info("already trained: %s, bundle %s (exported again from the run's best checkpoint %s: %s was deleted, or "
             "is not in registry.root=%s)", finished.run, reference(Path(finished.bundle)), finished.checkpoint,
             bundle, cfg.registry.root)
    log.info("%s", promote_if_better(Path(finished.bundle), cfg.registry.root, cfg.registry.name).message)
    finished.save(storage_path(cfg.train.storage_path))
    return finished.outcome()


def make_trainer(cfg: Config, loop_config: dict[str, Any], datasets: dict[str, ray.data.Dataset], name: str,
                 storage: str, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer for a run: workers and their resources, storage, failures, checkpoints, quiet logs, and
    TensorBoard curves in the run's folder. ``callbacks`` are more Ray Train callbacks, e.g. Tune's report callback
    when a sweep runs the trainer."""
    tc = cfg.train
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, datasets=datasets, dataset_config=ordered_ingest(),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=_use_gpu(cfg),
                                     resources_per_worker={"CPU": tc.cpus_per_worker},
                                     placement_strategy=tc.placement_strategy),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints, checkpoint_score_attribute=METRIC,
                                               checkpoint_score_order="min"),
            logging_config=LoggingConfig(log_level="WARNING"),  # the epoch lines say what matters
            callbacks=[*TensorBoardCurves.for_run(storage, name), *(callbacks or [])],
            # Ray Train reroutes print() through its loggers, which printed each epoch line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}))


def waiting_for_workers(cfg: Config) -> str:
    """What a Train run waits for before its first line: its workers' resources, then their start-up."""
    tc = cfg.train
    if tc.num_workers == 0:
        return "training in this process (local mode): building the model ..."
    gpus = " and 1 GPU" if _use_gpu(cfg) else ""
    return (f"waiting for {tc.cpus_per_worker:g} CPU{gpus} for each of {tc.num_workers} training worker(s), then "
            "starting them (imports, model) ...")


def ordered_ingest() -> DataConfig:
    """Ray Train's ingest with the rows in file order, so the same seed sees the same batches: reruns and sweep
    trials are comparable. (Train ignores the datasets' own contexts and starts from the driver's options.)"""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def best_checkpoint(result: ray.train.Result, name: str) -> tuple[Checkpoint, dict[str, Any]]:
    """The best checkpoint by val MAE and its metrics; :class:`NonFiniteLoss` if the run stopped on NaN/inf."""
    # Local mode keeps no ranking of checkpoints: its last one stands in for the best.
    best = result.get_best_checkpoint(METRIC, "min") if result.best_checkpoints else result.checkpoint
    if (result.return_value or {}).get("stopped") == "nonfinite_loss":
        raise NonFiniteLoss(f"the training loss became NaN or infinite in epoch {result.return_value['epoch']} of "
                            f"run {name}; the run stopped. Last good checkpoint: "
                            f"{best.path if best else 'none (it failed in the first epoch)'}. Lower train.lr or "
                            "check the data.")
    metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), result.metrics)
    return best, metrics


def export_bundle(checkpoint: Checkpoint, cfg: Config, plan: RunPlan, metrics: dict[str, Any], name: str) -> Path:
    """Write the checkpoint as a model bundle and register it as the next version in the registry."""
    loop_config = plan.loop_config(cfg)
    meta = {
        "name": cfg.registry.name, "run": name, "checkpoint": checkpoint.path,
        "model": to_dict(cfg.model), "image_size": loop_config["image_size"],
        "preprocessing": plan.manifest["preprocessing"],
        "target": {"mean": loop_config["target_mean"], "std": loop_config["target_std"]},
        "metrics": {**_numbers(metrics), "val_mae_mean_baseline": plan.baseline_mae},
        "data": {"prepared": str(Path(cfg.data.out).resolve()),
                 "manifest_fingerprint": plan.manifest["fingerprint"]},
        "train": to_dict(cfg.train), "augment": to_dict(cfg.augment),
    }
    with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as staging:
        state = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=True)
        write_bundle(Path(staging), state, meta)
        return register(Path(staging), cfg.registry.root, cfg.registry.name)


def preview_augmentations(cfg: Config) -> Path:
    """Write the augmentation preview grid for the first ``augment.preview_images`` training images."""
    image_size = read_manifest(cfg.data.out)["image_size"]
    rows = read_split(cfg.data.out, "train").take_batch(cfg.augment.preview_images, batch_format="numpy")
    images = BoneAgeCollate(image_size)(rows)["image"]
    log.info("augmenting %d images: %s", len(images), describe(torch.device("cpu"), "fp32", "train",
                                                                 why="augmentation computes in fp32"))
    return write_preview(images, cfg.augment, cfg.augment.preview_path, seed=cfg.train.seed)


def mean_baseline_mae(val: ray.data.Dataset, train_mean: float) -> float:
    """The val MAE of a model that always answers the training mean: what learning must beat."""
    ages = val.select_columns(["boneage"]).to_pandas()["boneage"]
    return float((ages - train_mean).abs().mean())


def run_name(cfg: Config, manifest: dict[str, Any]) -> str:
    """The derived name of a training run on the prepared dataset ``manifest`` describes (:func:`derived_name`)."""
    return derived_name(cfg, manifest["fingerprint"])


def learned_fingerprint(cfg: Config, manifest: dict[str, Any]) -> str:
    """A hash of what a run learns: the data and the settings that name the run (:func:`settings_fingerprint`)."""
    return settings_fingerprint(cfg, manifest["fingerprint"])


def storage_path(path: str) -> str:
    """Ray Train wants an absolute local path or a URI (s3://, gs://, ...)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _use_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu == "auto":
        if not ray.is_initialized():
            ray.init()
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.train.use_gpu)

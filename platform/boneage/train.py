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

from boneage.artifacts import atomic_directory, disk_full_reported, save_torch
from boneage.bundle import (BundleMeta, DataSource, TargetScale, promote_if_better, reference, register,
                            staging_folder, write_bundle)
from boneage.cluster import connect_to_ray, wants_gpu
from boneage.config import Config, config_from_dict, derived_name, settings_fingerprint, to_dict
from boneage.curves import TensorBoardCurves
from boneage.dataset import batch_tensors, read_manifest, read_split
from boneage.engine import EpochProgress, EvalSums, TrainStep, evaluate, synchronize
from boneage.errors import JobError
from boneage.model import NUM_BLOCKS, build_model
from boneage.precision import describe
from boneage.signals import attach_signals

log = logging.getLogger(__name__)

METRIC = "val_mae"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


@dataclass
class EpochMetrics:
    """What every epoch reports; its fields are the metrics a sweep can optimise (:data:`REPORTED_METRICS`)."""

    epoch: int  # 1-based
    train_loss: float  # mean L1 loss on the standardised target
    val_mae: float  # months
    val_rmse: float  # months
    images_per_s_per_worker: float
    lr: float  # the head's, at the epoch's end
    epoch_seconds: float
    resumed_at_epoch: int  # the epoch the run (re)started from: 0 unless it resumed from a checkpoint
    val_rows: int

    def finite(self) -> bool:
        """Whether the loss and the validation error are numbers (not NaN or infinite)."""
        return math.isfinite(self.train_loss) and math.isfinite(self.val_mae)


REPORTED_METRICS = tuple(f.name for f in dataclasses.fields(EpochMetrics))


@dataclass(frozen=True)
class LoopConfig:
    """What each training worker needs beside its data shards: the settings and the prepared data's facts."""

    cfg: Config
    image_size: int
    target: TargetScale  # the training split's label mean and SD: the model learns the standardised age
    train_rows: int
    local_checkpoint: str | None = None  # local mode only: where its checkpoint goes (Ray Train keeps none)

    def as_train_loop_config(self) -> dict[str, Any]:
        """Plain data for ``TorchTrainer(train_loop_config=...)``: Ray Train V2 takes a dict, and keeps a JSON copy
        of it for its dashboard."""
        return dataclasses.asdict(self)

    @classmethod
    def from_train_loop_config(cls, values: dict[str, Any]) -> LoopConfig:
        """The worker's side of :meth:`as_train_loop_config`."""
        return cls(**{**values, "cfg": config_from_dict(values["cfg"]), "target": TargetScale(**values["target"])})


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

def train_loop_per_worker(train_loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function, given a :class:`LoopConfig` as data; returns (rank 0) how the run ended."""
    loop = LoopConfig.from_train_loop_config(train_loop_config)
    cfg, tc = loop.cfg, loop.cfg.train
    # Ray Train logs every report at INFO through a logger named after its source file, which sits outside
    # "ray.train" and so escapes LoggingConfig: quiet the worker's root logger. The epoch lines are ours to print.
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, tc.threads_per_worker or round(tc.cpus_per_worker)))
    image_size, mean, std = loop.image_size, loop.target.mean, loop.target.std

    torch.manual_seed(tc.seed)  # the same initial weights for the same seed: reruns and sweep trials comparable
    net = build_model(cfg.model, image_size).to(memory_format=torch.channels_last)
    freezing = tc.freeze_epochs > 0 or tc.unfreeze_blocks < NUM_BLOCKS
    model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": freezing})
    if tc.compile:
        model = torch.compile(model)  # the DDP wrapper too: its optimizer splits graphs at gradient buckets
    steps_per_epoch = max(1, loop.train_rows // world // tc.batch_size)
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
        if not metrics.finite():  # reported without a checkpoint: the last good one stays best
            ray.train.report({**dataclasses.asdict(metrics), "nonfinite_loss": 1})
            return {"stopped": "nonfinite_loss", "epoch": epoch + 1}
        if rank == 0:
            print(format_epoch(metrics, tc.epochs), flush=True)
        report_with_checkpoint(metrics, step, rank, loop.local_checkpoint)
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


def epoch_metrics(step: TrainStep, val: EvalSums, epoch: int, started: float, train_seconds: float,
                  start_epoch: int) -> EpochMetrics:
    """The epoch's reported metrics, its sums taken over all workers (the epoch's one host sync); ``started``
    is the epoch's start on the ``time.perf_counter`` clock."""
    seen = torch.tensor(float(step.seen), device=step.loss_sum.device)
    loss, images, abs_error, squared_error, rows = _sum_over_workers(
        torch.stack([step.loss_sum, seen, val.abs_error, val.squared_error, val.count]))
    return EpochMetrics(
        epoch=epoch + 1, train_loss=loss / max(images, 1.0), val_mae=abs_error / max(rows, 1.0),
        val_rmse=math.sqrt(squared_error / max(rows, 1.0)),
        images_per_s_per_worker=step.seen / max(train_seconds, 1e-9), lr=step.optimizer.param_groups[0]["lr"],
        epoch_seconds=time.perf_counter() - started, resumed_at_epoch=start_epoch, val_rows=int(rows))


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


def report_with_checkpoint(metrics: EpochMetrics, step: TrainStep, rank: int, local_folder: str | None) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (weights, optimizer, scheduler, epoch).

    In local mode (no workers) Ray Train persists no checkpoints, so the checkpoint is written straight to
    ``local_folder`` (replaced atomically each epoch) and reported from there."""
    if local_folder:
        with atomic_directory(local_folder) as folder:
            save_checkpoint(Path(folder), metrics.epoch, step)
        ray.train.report(dataclasses.asdict(metrics), checkpoint=Checkpoint.from_directory(local_folder))
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(Path(folder), metrics.epoch, step)
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report(dataclasses.asdict(metrics), checkpoint=checkpoint)


def save_checkpoint(folder: Path, epoch: int, step: TrainStep) -> None:
    """The validated weights (the bundle's), and the training state."""
    save_torch(step.eval_net.state_dict(), folder / MODEL_FILE)
    save_torch({**step.state_dict(), "epoch": epoch}, folder / STATE_FILE)


def format_epoch(metrics: EpochMetrics, epochs: int) -> str:
    """One readable progress line."""
    return (f"epoch {metrics.epoch}/{epochs}  train_loss {metrics.train_loss:.3f}  "
            f"val_mae {metrics.val_mae:.2f} mo  val_rmse {metrics.val_rmse:.2f} mo  lr {metrics.lr:.2e}  "
            f"{metrics.images_per_s_per_worker:.0f} img/s/worker  {metrics.epoch_seconds:.0f} s")


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

    @property
    def image_size(self) -> int:
        """The prepared images' side in pixels."""
        return self.manifest["image_size"]

    @property
    def target(self) -> TargetScale:
        """The training split's label mean and SD."""
        train_stats = self.manifest["label_statistics"]["train"]
        return TargetScale(mean=train_stats["boneage_mean"], std=train_stats["boneage_std"])

    def loop_config(self, cfg: Config) -> LoopConfig:
        """The per-worker function's config for a run with settings ``cfg``."""
        return LoopConfig(cfg=cfg, image_size=self.image_size, target=self.target,
                          train_rows=self.manifest["splits"]["counts"]["train"])


def plan_run(cfg: Config) -> RunPlan:
    """Read the prepared dataset's manifest and splits (cached in the object store when asked)."""
    log.info("reading the prepared dataset %s ...", cfg.data.out)
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
    connect_to_ray()
    plan = plan_run(cfg)
    loop = plan.loop_config(cfg)
    if cfg.train.num_workers == 0:  # local mode: debugging in this process; it keeps only its last checkpoint
        if "://" in storage:
            raise ValueError("train.num_workers=0 (local mode) keeps its checkpoint in a local folder; set "
                             "train.storage_path to a local path")
        loop = dataclasses.replace(loop, local_checkpoint=str(Path(storage) / name / "local-checkpoint"))
    counts = plan.manifest["splits"]["counts"]
    log.info("training run %s: %d train / %d val images at %d px; predict-the-mean val MAE %.2f months", name,
             counts["train"], counts["val"], loop.image_size, plan.baseline_mae)
    log.info("%s", waiting_for_workers(cfg))
    with disk_full_reported("a training checkpoint", f"{storage}/{name}", "the run's earlier checkpoints are kept, "
                            "and the same job resumes from the last one"):
        result = make_trainer(cfg, loop, plan.datasets, name, storage).fit()
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


def make_trainer(cfg: Config, loop: LoopConfig, datasets: dict[str, ray.data.Dataset], name: str, storage: str,
                 callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer for a run: workers and their resources, storage, failures, checkpoints, quiet logs, and
    TensorBoard curves in the run's folder. ``callbacks`` are more Ray Train callbacks, e.g. Tune's report callback
    when a sweep runs the trainer."""
    tc = cfg.train
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop.as_train_loop_config(), datasets=datasets,
        dataset_config=ordered_ingest(),
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
    """Write the checkpoint as a model bundle with its trust signals and out-of-distribution detector, and
    register it as the next version in the registry."""
    with staging_folder() as staging:
        bundle = write_checkpoint_bundle(checkpoint, cfg, plan, metrics, name, staging)
        attach_signals(bundle, cfg.data.out)
        return register(bundle, cfg.registry.root, cfg.registry.name)


def write_checkpoint_bundle(checkpoint: Checkpoint, cfg: Config, plan: RunPlan, metrics: dict[str, Any], name: str,
                            folder: Path) -> Path:
    """A training checkpoint as a bundle in ``folder``, described by the run's settings (no signals yet)."""
    meta = BundleMeta(
        name=cfg.registry.name, model=cfg.model, image_size=plan.image_size, target=plan.target,
        data=DataSource(manifest_fingerprint=plan.manifest["fingerprint"],
                        prepared=str(Path(cfg.data.out).resolve())),
        metrics={**_numbers(metrics), "val_mae_mean_baseline": plan.baseline_mae}, run=name,
        checkpoint=checkpoint.path, preprocessing=plan.manifest["preprocessing"], train=to_dict(cfg.train),
        augment=to_dict(cfg.augment))
    with checkpoint.as_directory() as checkpoint_folder:
        state = torch.load(Path(checkpoint_folder) / MODEL_FILE, map_location="cpu", weights_only=True)
    return write_bundle(folder, state, meta)


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
    """Whether training workers take a GPU: ``train.use_gpu``, or for "auto" whether the cluster this process is
    connected to has one. Only asks: the caller connects first (:func:`connect_to_ray`)."""
    return wants_gpu(cfg.train.use_gpu, "train.use_gpu")

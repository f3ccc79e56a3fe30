"""Training curves for TensorBoard: train loss, val MAE / RMSE and learning rate per epoch, one TensorBoard run per
Ray Train run.

:class:`TensorBoardCurves` is a Ray Train ``UserCallback``: it runs in the Train controller (the driver side, never
in the step loop) and writes each epoch's reported metrics with PyTorch's ``SummaryWriter`` (whose ``flush`` waits
until the events are on disk, where tensorboardX's only queues them) into the run's own folder under
``train.storage_path``, beside its checkpoints. A sweep's trials are Train runs too, so each trial gets its own
TensorBoard run; Tune's own TensorBoard logger is switched off (:mod:`boneage.tune`) so no curve is written twice.
``tensorboard --logdir outputs/ray_results`` shows them all, tagged by metric name, stepped by epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.train import Checkpoint, UserCallback
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

# The reported metrics drawn as curves, under their own names.
CURVES = ("train_loss", "val_mae", "val_rmse", "lr")


class TensorBoardCurves(UserCallback):
    """Writes the curves of one Train run into ``folder``, one point per epoch."""

    @classmethod
    def for_run(cls, storage: str, name: str) -> list[TensorBoardCurves]:
        """The callback for run ``name`` under ``storage``: none when storage is a URI (s3://, gs://, ...), which
        PyTorch's writer cannot reach without extra packages; training must not fail over its curves."""
        if "://" in storage:
            log.info("no TensorBoard curves for run %s: train.storage_path %s is not a local folder", name, storage)
            return []
        return [cls(str(Path(storage) / name))]

    def __init__(self, folder: str):
        self.folder = folder
        self._writer: SummaryWriter | None = None  # opened in the controller: a writer does not pickle

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        """Every worker reported the same epoch's sums; rank 0's metrics are the run's."""
        reported = metrics[0]
        epoch = int(reported["epoch"])
        if self._writer is None:
            # A resumed run adds an event file to the folder. Its first epoch repeats or follows the interrupted
            # run's last one, and TensorBoard drops the older points from a repeated step on: each epoch is drawn once.
            self._writer = SummaryWriter(self.folder)
        for name in CURVES:
            self._writer.add_scalar(name, reported[name], global_step=epoch)
        self._writer.flush()  # once an epoch: the curve is current while the run goes on

"""The training step and evaluation, free of Ray: the Ray Train loop, the benchmarks and a GPU box without Ray
all run exactly this code.

A batch is a dict of tensors on the device: ``image`` (B, 1, S, S) uint8, ``boneage`` (B,) months,
``male`` (B,) 0/1. Nothing here waits on the device: losses and errors accumulate as device tensors.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from boneage.augment import build_augmentation
from boneage.config import Config
from boneage.model import BoneAgeNet, to_unit
from boneage.precision import autocast_for


class TrainStep:
    """One optimisation step: augment on the device (in [0, 1], the model's pixel convention), bf16 autocast where the
    hardware computes in bf16 (``train.precision``), L1 on the standardised target, gradient clipping, AdamW,
    warm-up + cosine learning rate; optionally a running average of the weights (``train.ema_epochs``), which is
    then what validation sees and checkpoints keep."""

    def __init__(self, model: nn.Module, net: BoneAgeNet, cfg: Config, steps_per_epoch: int, target_mean: float,
                 target_std: float, device: torch.device):
        self.model, self.net, self.cfg = model, net, cfg
        self.mean, self.std = target_mean, target_std
        self.augment = build_augmentation(cfg.augment).to(device)
        self.autocast = autocast_for(device, cfg.train.precision, "train")
        self.optimizer, self.scheduler, self.active = make_optimizer(net, cfg, steps_per_epoch)
        self.loss_sum = torch.zeros((), device=device)
        self.seen = 0
        self.recent: deque[dict[str, torch.Tensor]] = deque(maxlen=cfg.train.bn_recalibration_batches)
        ema_steps = cfg.train.ema_epochs * steps_per_epoch
        self.average = WeightAverage(net, decay=1.0 - 1.0 / max(ema_steps, 1.0)) if ema_steps else None

    @property
    def eval_net(self) -> BoneAgeNet:
        """The plain network that is validated, checkpointed and exported: the weight average when on."""
        return self.average.module if self.average else self.net

    @property
    def eval_model(self) -> nn.Module:
        """What validation runs: the weight average when on, else the training model (DDP-wrapped, compiled)."""
        return self.average.module if self.average else self.model

    def start_epoch(self, epoch: int) -> None:
        """Apply the freezing schedule and reset the epoch's running loss."""
        tc = self.cfg.train
        trainable = tc.unfreeze_blocks if epoch >= tc.freeze_epochs else 0
        for net in {self.net, self.eval_net}:  # one network when there is no weight average
            net.freeze_bottom_blocks(len(net.stages) - trainable)
        frozen = self.net.frozen_stages()
        self.active.update({name: 0.0 if name in frozen else 1.0 for name in self.active})
        self.model.train()
        self.loss_sum.zero_()
        self.seen = 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        image = self.augment(to_unit(batch["image"]))  # Kornia computes in floats
        target = (batch["boneage"] - self.mean) / self.std
        with self.autocast:
            prediction = self.model(image, batch["male"])  # (B,) standardised
        loss = F.l1_loss(prediction.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.average:
            self.average.update()
        self.loss_sum += loss.detach() * len(target)  # on the device: no host sync per step
        self.seen += len(target)
        self.recent.append(batch)  # un-augmented, for recalibrate_batchnorm

    def recalibrate_batchnorm(self) -> None:
        """Re-estimate the trainable batch-norm layers' running statistics of :attr:`eval_net` with its current
        weights, from the epoch's last ``train.bn_recalibration_batches`` batches, un-augmented like validation
        images. The weight average has no statistics of its own: it always needs this.

        Why: early in training the weights move faster than the running averages (momentum 0.1) follow, so eval
        mode reads stale statistics and val MAE swings wildly (one epoch at lr 9e-4: 194 months, the next 34),
        which misleads checkpoint selection and ASHA's early stopping. Across workers the statistics are averaged.
        """
        net = self.eval_net.train()
        layers = [layer for layer in net.modules()
                  if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training]  # frozen ones: eval
        if not layers or not self.recent:
            return
        momenta = [layer.momentum for layer in layers]
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # a plain average over the batches
        with torch.no_grad(), self.autocast:
            for batch in self.recent:
                net(batch["image"], batch["male"])
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        self.recent.clear()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for layer in layers:
                for stats in (layer.running_mean, layer.running_var):
                    torch.distributed.all_reduce(stats)
                    stats /= torch.distributed.get_world_size()

    def state_dict(self) -> dict:
        """What resuming needs besides :attr:`eval_net`'s weights: the optimizer and scheduler, and with a weight
        average the trained weights and the average's update count."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.average:
            state.update(trained_weights=self.net.state_dict(), average_updates=self.average.updates)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average:
            self.net.load_state_dict(state["trained_weights"])
            self.average.updates = state["average_updates"]


class WeightAverage:
    """A bias-corrected exponential moving average of a network's weights, kept in a copy of it (``module``).

    Why: at a high learning rate the weights jitter about the valley floor, so one epoch's snapshot scores months
    better or worse than the next, and checkpoint selection and ASHA's early comparisons rank trials by luck. The
    average sits near the floor, much as if the learning rate had already decayed, so a high-lr trial is judged
    by where it is heading. Not torch's ``AveragedModel``: its update reads a device counter on the host, a sync
    per step.
    """

    def __init__(self, net: BoneAgeNet, decay: float):
        self.module = copy.deepcopy(net).requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._averaged, self._current = list(self.module.parameters()), list(net.parameters())

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights. The k-th update weighs them (1 - d) / (1 - d^k): the
        first copies them, early ones give a plain mean, and the initial weights never linger in the average."""
        self.updates += 1
        weight = (1.0 - self.decay) / (1.0 - self.decay ** self.updates)
        torch._foreach_lerp_(self._averaged, self._current, weight)


class EpochProgress:
    """Progress within an epoch from the host's clock and counts only (no wait on the device): ``advance`` after
    each step returns a line such as ``epoch 2/6: 640/1400 images, 11.3 img/s, about 67 s left in the epoch``
    once ``interval_s`` has passed since the last one, else None. Counts are one worker's times ``workers``: every
    worker runs the same number of steps. On a GPU the host runs a few steps ahead of the device, so the rate is
    that of queueing the work; over 30 s the difference is a few steps."""

    def __init__(self, epoch: int, epochs: int, images_per_epoch: int, workers: int, interval_s: float):
        self.epoch, self.epochs, self.total, self.workers = epoch, epochs, images_per_epoch, workers
        self.interval_s, self.done = interval_s, 0
        self.started = self.last_line = time.perf_counter()

    def advance(self, images: int) -> str | None:
        """Count ``images`` more from this worker; the progress line when one is due."""
        self.done += images * self.workers
        now = time.perf_counter()
        if now - self.last_line < self.interval_s:
            return None
        self.last_line = now
        rate = self.done / max(now - self.started, 1e-9)
        left = max(self.total - self.done, 0) / max(rate, 1e-9)
        return (f"epoch {self.epoch}/{self.epochs}: {self.done}/{self.total} images, {rate:.1f} img/s, "
                f"about {left:.0f} s left in the epoch")


@dataclass
class EvalSums:
    """An evaluation's sums over its batches, errors in months, as device tensors (reading them syncs)."""

    abs_error: torch.Tensor
    squared_error: torch.Tensor
    count: torch.Tensor


def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], mean: float, std: float,
             device: torch.device, precision: str = "auto") -> EvalSums:
    """Sums of |error| and error^2 over the batches, and their count, without a sync. Computes in the precision a
    trained model predicts in (``job="predict"``), so val MAE is what serving will see."""
    model.eval()
    abs_sum, sq_sum, count = (torch.zeros((), device=device) for _ in range(3))
    with torch.no_grad(), autocast_for(device, precision, "predict"):
        for batch in batches:
            error = model(batch["image"], batch["male"]).float() * std + mean - batch["boneage"]
            abs_sum += error.abs().sum()
            sq_sum += error.square().sum()
            count += len(error)
    return EvalSums(abs_error=abs_sum, squared_error=sq_sum, count=count)


def make_optimizer(model: BoneAgeNet, cfg: Config, steps_per_epoch: int):
    """AdamW over the model's named parameter groups (the head and each stage), with warm-up + cosine decay to zero.

    Returns the optimizer, its scheduler and ``active``: learning-rate factors by group name, set to 0 for frozen
    stages, so they do not move even under weight decay.
    """
    tc = cfg.train
    groups = model.parameter_groups(tc.lr, tc.backbone_lr_scale, tc.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    warmup = tc.warmup_epochs * steps_per_epoch
    total = tc.epochs * steps_per_epoch

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

    active = {group["name"]: 1.0 for group in groups}
    lambdas = [lambda step, name=group["name"]: schedule(step) * active[name] for group in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas), active


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing; never inside the step loop)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""The training step without Ray: batch-norm recalibration before validation, the weight average, bf16 steps."""

import copy

import pytest
import torch

from boneage.config import load_config
from boneage.engine import EpochProgress, TrainStep, WeightAverage
from boneage.model import build_model

SIZE = 32


def make_step(*overrides):
    cfg = load_config(overrides=["model.head=[16]", "model.dropout=0", "model.sex_embedding=4", "train.batch_size=8",
                                 "train.lr=3e-3", *overrides])
    torch.manual_seed(0)
    net = build_model(cfg.model, SIZE).to(memory_format=torch.channels_last)
    step = TrainStep(net, net, cfg, steps_per_epoch=4, target_mean=120.0, target_std=40.0, device=torch.device("cpu"))
    step.start_epoch(0)
    return step, net


def batch(seed: int, size: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (size, 1, SIZE, SIZE), dtype=torch.uint8, generator=generator),
            "boneage": torch.rand(size, generator=generator) * 228,
            "male": (torch.rand(size, generator=generator) > 0.5).float()}


def eval_and_train_mode_outputs(net, images):
    """The eval-mode output, and the train-mode output (batch statistics) of a copy, for the same images."""
    with torch.no_grad():
        training = copy.deepcopy(net).train()(images["image"], images["male"])
        return net.eval()(images["image"], images["male"]), training


@pytest.mark.parametrize("ema", ["train.ema_epochs=0", "train.ema_epochs=0.5"])
def test_recalibration_makes_eval_mode_read_the_current_weights_statistics(ema):
    step, _ = make_step("train.bn_recalibration_batches=1", "train.precision=fp32", ema)
    for seed in range(4):
        step(batch(seed))  # a high learning rate: the running averages lag the weights
    last, net = batch(3), step.eval_net  # the weight average has no statistics of its own until recalibrated
    stale, truth = eval_and_train_mode_outputs(net, last)
    step.recalibrate_batchnorm()
    recalibrated, truth = eval_and_train_mode_outputs(net, last)
    # One batch: the running statistics are that batch's (the variance unbiased, hence not exact), so eval mode
    # now answers as the batch statistics do; before, it was far off.
    error, stale_error = (recalibrated - truth).abs().max(), (stale - truth).abs().max()
    assert error < 0.05 * truth.abs().max() and error < 0.1 * stale_error


def test_recalibration_leaves_frozen_blocks_alone():
    step, net = make_step("train.bn_recalibration_batches=2", "train.unfreeze_blocks=2", "train.precision=fp32")
    frozen_bn = net.features[1]
    assert isinstance(frozen_bn, torch.nn.BatchNorm2d) and not frozen_bn.training
    before = frozen_bn.running_mean.clone()
    top_bn = [m for m in net.features if isinstance(m, torch.nn.BatchNorm2d)][-1]
    top_before = top_bn.running_mean.clone()
    step(batch(0))
    step(batch(1))
    step.recalibrate_batchnorm()
    assert torch.equal(frozen_bn.running_mean, before)
    assert not torch.equal(top_bn.running_mean, top_before)
    assert top_bn.momentum == 0.1  # restored after the plain average


def test_zero_recalibration_batches_turns_it_off():
    step, net = make_step("train.bn_recalibration_batches=0")
    step(batch(0))
    state = copy.deepcopy(net.state_dict())
    step.recalibrate_batchnorm()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_in_each_precision_learns(precision):
    step, net = make_step(f"train.precision={precision}", "train.lr=1e-3")
    data = batch(0)
    step(data)
    first = step.loss_sum.item()
    for _ in range(6):
        step(data)
    assert torch.isfinite(step.loss_sum) and step.seen == 7 * 32
    step.start_epoch(1)
    step(data)
    assert step.loss_sum.item() < first  # the same batch, fitted better


def test_weight_average_copies_then_averages_without_leaning_on_the_start():
    net = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(net, decay=0.5)
    seen = []
    for value in (1.0, 3.0, 5.0):
        net.weight.data.fill_(value)
        average.update()
        seen.append(average.module.weight.item())
    # Bias-corrected EMA, d = 0.5: weights (1 - d) d^(k - i) / (1 - d^k) -> 1; (1 + 2 * 3) / 3; (1 + 2 * 3 + 4 * 5) / 7
    assert seen == pytest.approx([1.0, 7 / 3, 27 / 7])
    assert net.weight.item() == 5.0 and not average.module.weight.requires_grad


def train_steps(step, seeds):
    for seed in seeds:
        torch.manual_seed(seed)  # the same augmentations
        step(batch(seed))


def test_weight_average_is_validated_and_leaves_training_alone():
    plain, plain_net = make_step("train.precision=fp32")
    averaged, averaged_net = make_step("train.precision=fp32", "train.ema_epochs=1")
    train_steps(plain, range(3))
    train_steps(averaged, range(3))
    assert averaged.eval_net is not averaged_net and averaged.eval_model is averaged.eval_net
    assert plain.eval_net is plain_net
    trained, average = averaged_net.state_dict(), averaged.eval_net.state_dict()
    assert all(torch.equal(plain_net.state_dict()[k], v) for k, v in trained.items())  # the same training
    assert not torch.equal(average["head.1.weight"], trained["head.1.weight"])


def test_weight_average_resumes_where_it_left_off():
    """A checkpoint holds the average as the model weights, the trained weights and the update count in the
    training state: a restored step continues exactly as the original one."""
    original, _ = make_step("train.precision=fp32", "train.ema_epochs=1")
    train_steps(original, range(2))
    weights, state = copy.deepcopy(original.eval_net.state_dict()), copy.deepcopy(original.state_dict())
    restored, _ = make_step("train.precision=fp32", "train.ema_epochs=1")
    restored.eval_net.load_state_dict(weights)
    restored.load_state_dict(state)
    assert restored.average.updates == 2
    train_steps(original, [5])
    train_steps(restored, [5])
    for name, tensor in original.eval_net.state_dict().items():
        assert torch.allclose(restored.eval_net.state_dict()[name], tensor), name
    for name, tensor in original.net.state_dict().items():
        assert torch.allclose(restored.net.state_dict()[name], tensor), name


def test_progress_counts_every_workers_images_and_speaks_only_when_due():
    quiet = EpochProgress(epoch=2, epochs=5, images_per_epoch=640, workers=2, interval_s=3600)
    assert quiet.advance(16) is None  # not due yet
    due = EpochProgress(epoch=2, epochs=5, images_per_epoch=640, workers=2, interval_s=0)
    lines = [due.advance(16) for _ in range(3)]
    assert lines[0].startswith("epoch 2/5: 32/640 images, ") and lines[2].startswith("epoch 2/5: 96/640 images, ")
    assert all(line.endswith("s left in the epoch") and " img/s, about " in line for line in lines)

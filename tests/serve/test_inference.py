"""Inference without Ray: batching does not change answers, and the cheaper Grad-CAM (the top block's, with the
lower blocks frozen) gives the textbook map."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from boneage.bundle import load_bundle
from boneage.config import load_config
from boneage.engine import TrainStep, evaluate
from boneage.inference import BoneAgePredictor
from helpers import make_bundle


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    folder, _ = make_bundle(tmp_path_factory.mktemp("bundle") / "b", seed=5)
    return BoneAgePredictor(load_bundle(folder), overlay_size=96)


@pytest.fixture(scope="module")
def radiographs(predictor, phantom_dir):
    return [predictor.decode(path.read_bytes()) for path in sorted(phantom_dir.rglob("*.png"))[:4]]


def test_a_batch_gives_each_image_its_own_answer(predictor, radiographs):
    canvases = np.stack([r.canvas for r in radiographs])
    male = np.array([True, False, True, False])
    batched = predictor.predict(canvases, male)
    singles = [predictor.predict(c[None], m[None])[0] for c, m in zip(canvases, male)]
    assert batched == pytest.approx(singles, abs=1e-4)
    assert len(set(np.round(batched, 5))) == 4  # a random model's answers differ only slightly, but they differ


# Random models whose estimates all lie above (seed 0) or all below (seed 3) the training set's mean age.
@pytest.mark.parametrize("seed, above_the_mean", [(0, True), (3, False)])
def test_gradcam_block5_is_the_textbook_grad_cam_on_the_whole_model(radiographs, tmp_path, seed, above_the_mean):
    predictor = BoneAgePredictor(load_bundle(make_bundle(tmp_path / "b", seed=seed)[0]), overlay_size=96)
    net = copy.deepcopy(predictor.bundle.model).float().eval()  # unfrozen, fp32: gradients through every layer
    last_relu = [m for m in net.features if isinstance(m, torch.nn.ReLU)][-1]  # the README's target layer
    for radiograph in radiographs[:2]:
        for male in (True, False):
            expected, standardised = textbook_grad_cam(net, last_relu, radiograph.canvas, male)
            assert (standardised > 0) == above_the_mean  # both signs of the target are covered
            assert expected.max() == pytest.approx(1.0) and expected.shape == radiograph.canvas.shape
            heatmap = predictor.heatmaps(radiograph.canvas[None], np.array([male]), "gradcam-block5")[0]
            np.testing.assert_allclose(heatmap, expected, atol=1e-4)
    assert predictor.explain(radiographs[0], male=True).overlay_png[:8] == b"\x89PNG\r\n\x1a\n"


def textbook_grad_cam(net, layer, canvas: np.ndarray, male: bool) -> tuple[np.ndarray, float]:
    """Grad-CAM by its definition (Selvaraju et al. 2017) with plain autograd, and the standardised estimate. The
    target is the estimate's distance from the training set's mean age, |standardised output| (README); the
    channel weights are the spatial means of its gradient with respect to the layer's activations; the map is the
    ReLU of their weighted sum, scaled to [0, 1], upsampled bilinearly to the image and scaled again (the API's
    normalisation)."""
    captured = []
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        image = torch.from_numpy(canvas)[None, None].float() / 255.0
        output = net(image, torch.tensor([float(male)]))  # (1,) standardised bone age
    finally:
        hook.remove()
    (gradient,) = torch.autograd.grad(output.abs().sum(), captured[0])
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = torch.relu((weights * captured[0]).sum(dim=1, keepdim=True)).detach()  # (1, 1, h, w)
    cam = F.interpolate(unit_range(cam), size=canvas.shape, mode="bilinear", align_corners=False)
    return unit_range(cam)[0, 0].numpy(), output.item()


def unit_range(cam: torch.Tensor) -> torch.Tensor:
    """Shift and scale to [0, 1], with pytorch-grad-cam's guard against an empty map."""
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-7)


def test_bf16_answers_stay_within_a_month_of_fp32_and_do_not_depend_on_the_batch(predictor, radiographs):
    bundle = predictor.bundle
    canvases = np.stack([r.canvas for r in radiographs])
    male = np.array([True, False, True, False])
    fp32 = BoneAgePredictor(bundle, precision="fp32").predict(canvases, male)
    bf16_predictor = BoneAgePredictor(bundle, precision="bf16")
    bf16 = bf16_predictor.predict(canvases, male)
    assert np.abs(bf16 - fp32).max() < 1.0 and not np.array_equal(bf16, fp32)  # bf16 really ran
    singles = [bf16_predictor.predict(c[None], m[None])[0] for c, m in zip(canvases, male)]
    assert bf16 == pytest.approx(singles, abs=1e-4)


NO_AUGMENTATION = ["augment.rotation_range=0", "augment.width_shift_range=0", "augment.height_shift_range=0",
                   "augment.zoom_range=0", "augment.horizontal_flip=false", "augment.brightness_range=[1, 1]"]


def record_network_inputs(net, seen: list):
    """Append to ``seen`` every tensor that enters ``net``'s first layer (block1's first convolution)."""
    first = net.get_submodule(net.stages[0].modules[0])
    return first.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))


def test_training_validation_and_serving_feed_the_network_the_same_input(predictor, radiographs):
    """The stored uint8 canvas reaches the network identically in a training step (augmentation off), batch-norm
    recalibration, validation, prediction and Grad-CAM: one pixel convention, in the model."""
    canvases = np.stack([r.canvas for r in radiographs])  # (B, S, S) uint8, as stored in training data
    batch = {"image": torch.from_numpy(canvases).unsqueeze(1), "boneage": torch.tensor([60.0, 90.0, 120.0, 150.0]),
             "male": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    cfg = load_config(overrides=[*NO_AUGMENTATION, "train.precision=fp32", "train.bn_recalibration_batches=1"])
    net = copy.deepcopy(predictor.bundle.model)
    step = TrainStep(net, net, cfg, steps_per_epoch=1, target_mean=120.0, target_std=40.0,
                     device=torch.device("cpu"))
    step.start_epoch(0)
    training, serving = [], []
    handles = [record_network_inputs(net, training), record_network_inputs(predictor.model, serving),
               record_network_inputs(predictor._explainers[0].net, serving)]
    try:
        step(batch)
        step.recalibrate_batchnorm()
        evaluate(net, [batch], 120.0, 40.0, torch.device("cpu"), "fp32")
        predictor.predict(canvases, np.array([True, False, True, False]))
        explained = [predictor.explain(r, male=True) for r in radiographs[:2]]
    finally:
        for handle in handles:
            handle.remove()
    assert len(training) == 3 and len(serving) == 1 + 2  # explain: Grad-CAM's pass (the answer is predict's)
    for seen in training + serving[:1]:
        assert seen.dtype == torch.float32 and torch.equal(seen, training[0])
    for i, _ in enumerate(explained):
        assert torch.equal(serving[1 + i], training[0][i:i + 1])
    assert -2.2 < training[0].min() < training[0].max() < 2.7  # ImageNet-normalised [0, 1], not 0..255

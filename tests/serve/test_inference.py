"""Inference without Ray: batching does not change answers, and the cheaper Grad-CAM gives the textbook map."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM

from boneage.bundle import load_bundle
from boneage.config import load_config
from boneage.engine import TrainStep, evaluate
from boneage.inference import BoneAgePredictor, BoneAgeTarget, _SexConditioned
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


def test_explain_matches_predict_and_plain_grad_cam_on_the_whole_model(predictor, radiographs):
    radiograph = radiographs[0]
    explanation = predictor.explain(radiograph, male=True)
    assert explanation.bone_age_months == pytest.approx(predictor.predict(radiograph.canvas[None],
                                                                          np.array([True]))[0], abs=1e-3)
    # The textbook way: gradients through every layer of an unfrozen copy.
    reference_net = copy.deepcopy(predictor.bundle.model).eval()
    wrapper = _SexConditioned(reference_net)
    wrapper.male = torch.tensor([1.0])
    last_relu = [m for m in reference_net.features if isinstance(m, torch.nn.ReLU)][-1]
    image = torch.from_numpy(radiograph.canvas)[None, None].float() / 255.0
    expected = GradCAM(model=wrapper, target_layers=[last_relu])(input_tensor=image, targets=[BoneAgeTarget()])[0]
    assert expected.max() > 0
    np.testing.assert_allclose(explanation.heatmap, expected, atol=1e-4)
    assert explanation.overlay_png[:8] == b"\x89PNG\r\n\x1a\n"


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
               record_network_inputs(predictor._explainer.net, serving)]
    try:
        step(batch)
        step.recalibrate_batchnorm()
        evaluate(net, [batch], 120.0, 40.0, torch.device("cpu"), "fp32")
        predictor.predict(canvases, np.array([True, False, True, False]))
        explained = [predictor.explain(r, male=True) for r in radiographs[:2]]
    finally:
        for handle in handles:
            handle.remove()
    assert len(training) == 3 and len(serving) == 1 + 2 * 2  # explain: Grad-CAM's pass, then predict's
    for seen in training + serving[:1]:
        assert seen.dtype == torch.float32 and torch.equal(seen, training[0])
    for i, _ in enumerate(explained):
        assert torch.equal(serving[1 + 2 * i], training[0][i:i + 1])
    assert -2.2 < training[0].min() < training[0].max() < 2.7  # ImageNet-normalised [0, 1], not 0..255

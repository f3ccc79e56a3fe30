"""Inference without Ray: batching does not change answers, and the cheaper Grad-CAM gives the textbook map."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM

from boneage.bundle import load_bundle
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

"""Test-time augmentation (boneage.tta): the views keep the model's pixel convention and framing, the answers are
the average over the views in every path (predict, explain, the settings of serve, predict and eval)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boneage.bundle import load_bundle
from boneage.config import AnswerConfig, ConfigError, load_config
from boneage.inference import BoneAgePredictor
from boneage.tta import VIEWS, make_views
from helpers import make_bundle, synthetic_trust


def padded_canvases(count: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    """(count, size, size) uint8 as fit_to_square frames a landscape film: black bands above and below (rows 0-15
    and 48-63), an asymmetric picture between them (never black, so it can be told from the padding)."""
    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, size, size), dtype=np.uint8)
    canvases[:, size // 4:3 * size // 4] = rng.integers(40, 256, (count, size // 2, size), dtype=np.uint8)
    canvases[:, size // 4:size // 2, :size // 3] = 250  # a bright block on the left: the mirror image differs
    return canvases


@pytest.fixture(scope="module")
def bundle_folder(tmp_path_factory):
    folder, _ = make_bundle(tmp_path_factory.mktemp("tta") / "b", seed=7, trust=synthetic_trust(7))
    return folder


@pytest.mark.parametrize("choice", list(VIEWS))
def test_views_keep_shape_pixel_convention_and_black_padding(choice):
    canvases = padded_canvases()
    views = make_views(torch.from_numpy(canvases).unsqueeze(1), choice)
    count = len(VIEWS[choice])
    assert views.shape == (count * 2, 1, 64, 64) and views.dtype == torch.float32
    assert 0.0 <= float(views.min()) and float(views.max()) <= 1.0
    assert torch.equal(views[:2, 0], torch.from_numpy(canvases).float() / 255)  # view 0 is the image itself
    # The black bands stay black in every view: a 5-degree turn moves the picture's edge by under 3 px at the sides.
    assert float(views[:, :, :12].abs().max()) == 0.0 and float(views[:, :, -12:].abs().max()) == 0.0
    assert float(views[:, :, 24:40].min()) > 0.0  # and the picture is still there


def test_flip_mirrors_and_rotation_fills_with_black():
    canvases = padded_canvases()
    flipped = make_views(torch.from_numpy(canvases).unsqueeze(1), "flip")[2:, 0]
    assert torch.equal(flipped, torch.from_numpy(canvases[:, :, ::-1].copy()).float() / 255)
    white = torch.full((1, 1, 64, 64), 255, dtype=torch.uint8)
    turned = make_views(white, "rotate")[1:, 0]  # +5 and -5 degrees
    assert float(turned[:, 0, 0].max()) == 0.0 and float(turned[:, -1, -1].max()) == 0.0  # uncovered corners black
    assert float(turned[:, 8:56, 8:56].min()) == pytest.approx(1.0)  # not the border's white, not reflected


def test_tta_answers_average_the_views(bundle_folder):
    canvases, male = padded_canvases(3, seed=1), np.array([True, False, True])
    bundle = load_bundle(bundle_folder)
    plain = BoneAgePredictor(bundle, AnswerConfig(calibrate=False), precision="fp32")
    flip = BoneAgePredictor(bundle, AnswerConfig(calibrate=False, tta="flip"), precision="fp32")
    by_hand = (plain.predict(canvases, male) + plain.predict(canvases[:, :, ::-1].copy(), male)) / 2
    assert flip.predict(canvases, male) == pytest.approx(by_hand, abs=1e-3)
    assert np.abs(flip.predict(canvases, male) - plain.predict(canvases, male)).min() > 1e-3  # the views count


def test_a_flip_invariant_model_answers_the_same_with_and_without_tta(bundle_folder):
    bundle = load_bundle(bundle_folder)
    with torch.no_grad():  # mirror-symmetric kernels: the network cannot tell a hand from its mirror image
        for conv in (m for m in bundle.model.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    canvases, male = padded_canvases(3, seed=2), np.array([False, True, True])
    plain = BoneAgePredictor(bundle, AnswerConfig(calibrate=False), precision="fp32").predict(canvases, male)
    flip = BoneAgePredictor(bundle, AnswerConfig(calibrate=False, tta="flip"), precision="fp32").predict(canvases, male)
    assert flip == pytest.approx(plain, abs=1e-3)


def test_the_setting_reaches_the_answers(bundle_folder, phantom_dir):
    predictor = BoneAgePredictor(load_bundle(bundle_folder), AnswerConfig(tta="flip+rotate"), overlay_size=96)
    radiograph = predictor.decode(sorted(phantom_dir.rglob("*.png"))[0].read_bytes())
    predicted = predictor.predict(radiograph.canvas[None], np.array([True]))[0]
    assert predictor.answer(radiograph.canvas[None], np.array([True])).months[0] == predicted
    plain = BoneAgePredictor(load_bundle(bundle_folder), AnswerConfig(tta="none"))
    assert abs(predicted - plain.predict(radiograph.canvas[None], np.array([True]))[0]) > 1e-3


@pytest.mark.parametrize("area", ["serve", "predict", "eval"])
def test_the_setting_takes_the_choices_and_rejects_others_naming_the_key(area):
    assert getattr(load_config(overrides=[f"{area}.tta=flip+rotate"]), area).tta == "flip+rotate"
    assert getattr(load_config(), area).tta == "none"  # off by default: it pays too little (bench/tta.py)
    with pytest.raises(ConfigError, match=rf"{area}\.tta.*none, flip, rotate, flip\+rotate"):
        load_config(overrides=[f"{area}.tta=mirror"])


def test_the_service_settings_reach_the_predictor(bundle_folder):
    settings = load_config(overrides=[f"serve.model_uri={bundle_folder}", "serve.tta=rotate"]).serve
    assert BoneAgePredictor.from_settings(settings).tta == "rotate"

"""The pointing game (boneage.localisation) and the named heat-map methods (BoneAgePredictor.heatmaps)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage.bundle import load_bundle
from boneage.config import ServeConfig
from boneage.imaging import fit_to_square
from boneage.inference import (DEFAULT_EXPLAINER, EXPLAINERS, BoneAgePredictor, UnknownExplainer,
                               encode_png)
from boneage.localisation import (box_mask, canvas_boxes, localisation_scores, mass_inside, peak_inside,
                                  random_point_share)
from helpers import make_bundle


def write_film(folder, image_id: str, width: int, height: int, box: tuple[int, int, int, int]):
    """A black film with one white rectangle covering the pixels of ``box`` (x0, y0, x1, y1, x1/y1 exclusive)."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    path = folder / f"{image_id}.png"
    Image.fromarray(pixels).save(path)
    return path


def test_boxes_land_where_fit_to_square_puts_their_pixels_on_a_padded_canvas(tmp_path):
    # 200 x 100 film on a 32 px canvas: scale 0.16, the image 32 x 16 px, 8 px of black padding above and below.
    box = (50, 25, 100, 50)
    path = write_film(tmp_path, "7", 200, 100, box)
    pd.DataFrame([("7", "radius", *box)], columns=["id", "structure", "x0", "y0", "x1", "y1"]).to_csv(
        tmp_path / "boxes.csv", index=False)
    mapped = canvas_boxes(tmp_path / "boxes.csv", {"7": path}, 32)["7"]
    np.testing.assert_allclose(mapped, [[8.0, 12.0, 16.0, 16.0]])
    canvas = fit_to_square(Image.open(path), 32)
    mask = box_mask(mapped, 32)
    assert mask.sum() == 8 * 4
    np.testing.assert_array_equal(canvas > 127, mask)  # the white rectangle is the box, edge blur aside


def test_an_image_without_boxes_maps_to_none(tmp_path):
    path = write_film(tmp_path, "8", 40, 50, (0, 0, 1, 1))
    pd.DataFrame(columns=["id", "structure", "x0", "y0", "x1", "y1"]).to_csv(tmp_path / "boxes.csv", index=False)
    assert canvas_boxes(tmp_path / "boxes.csv", {"8": path}, 32)["8"].shape == (0, 4)


def blob(size: int, row: float, col: float, sd: float = 2.0) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    return np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sd ** 2)).astype(np.float32)


BOXES = np.array([[4.0, 4.0, 10.0, 8.0], [20.0, 24.0, 26.0, 30.0]])  # canvas coordinates, 32 px


def test_a_peak_inside_a_box_scores_and_one_outside_does_not():
    inside = blob(32, row=27.0, col=23.0)  # the middle of the second box
    outside = blob(32, row=16.0, col=16.0)
    assert peak_inside(inside, BOXES) and not peak_inside(outside, BOXES)
    assert mass_inside(inside, BOXES) > 0.7 > 0.05 > mass_inside(outside, BOXES)
    assert mass_inside(np.zeros((32, 32)), BOXES) == 0.0


def test_a_flat_topped_peak_counts_at_its_middle_not_its_first_pixel():
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[0:12, 0:12] = 1.0  # an upsampled 2x2 map's corner: its middle (6, 6) is in the first box, (0, 0) is not
    assert peak_inside(heat, BOXES)


def test_random_point_share_is_the_area_of_the_union_of_boxes():
    assert random_point_share(np.array([[0.0, 0.0, 16.0, 32.0]]), 32) == 0.5
    assert random_point_share(np.array([[0.0, 0.0, 16.0, 32.0], [8.0, 0.0, 16.0, 32.0]]), 32) == 0.5
    assert random_point_share(BOXES, 32) == pytest.approx((6 * 4 + 6 * 6) / 32 ** 2)
    assert random_point_share(np.array([[3.25, 3.25, 3.75, 3.75]]), 32) == 1 / 32 ** 2  # a box inside one pixel
    assert random_point_share(np.zeros((0, 4)), 32) == 0.0


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return BoneAgePredictor(load_bundle(make_bundle(tmp_path_factory.mktemp("bundle") / "b", seed=5)[0]))  # 64 px


@pytest.fixture(scope="module")
def canvases(phantom_dir):
    paths = sorted(phantom_dir.rglob("*.png"))[:3]
    return np.stack([fit_to_square(Image.open(p).convert("L"), 64) for p in paths])


@pytest.mark.parametrize("method", list(EXPLAINERS))
def test_every_explainer_gives_one_unit_range_map_per_image_independent_of_the_batch(predictor, canvases, method):
    male = np.array([True, False, True])
    maps = predictor.heatmaps(canvases, male, method)
    assert maps.shape == canvases.shape and maps.dtype == np.float32
    assert maps.min() >= 0.0 and np.allclose(maps.max(axis=(1, 2)), 1.0, atol=1e-4)
    single = predictor.heatmaps(canvases[1:2], male[1:2], method)[0]
    np.testing.assert_allclose(maps[1], single, atol=1e-4)
    if EXPLAINERS[method].mask_padding:
        assert maps[:, :, :3].max() == 0.0  # phantom films are 0.8 as wide as high: black columns either side


def test_serving_explains_with_the_default_explainer(predictor, canvases):
    radiograph = predictor.decode(encode_png(canvases[0]))
    explanation = predictor.explain(radiograph, male=True)
    expected = predictor.heatmaps(radiograph.canvas[None], np.array([True]), DEFAULT_EXPLAINER)[0]
    np.testing.assert_allclose(explanation.heatmap, expected, atol=1e-5)
    with pytest.raises(UnknownExplainer, match=r"unknown explainer 'saliency' \(serve.explainer\); choose one of: "):
        predictor.heatmaps(canvases, np.ones(3, bool), "saliency")


def test_serve_explainer_picks_the_method_and_an_unknown_one_fails_before_serving(predictor):
    folder = str(predictor.bundle.path)
    chosen = BoneAgePredictor.from_settings(ServeConfig(model_uri=folder, explainer="layercam-block3"))
    assert chosen.explainer_name == "layercam-block3"
    assert BoneAgePredictor.from_settings(ServeConfig(model_uri=folder)).explainer_name == DEFAULT_EXPLAINER
    with pytest.raises(UnknownExplainer, match="'saliency'"):
        BoneAgePredictor.from_settings(ServeConfig(model_uri=folder, explainer="saliency"))


def test_localisation_scores_one_entry_per_method_with_the_chosen_marked(predictor, canvases):
    boxes = [BOXES] * len(canvases)
    scores = localisation_scores(predictor, canvases, np.array([True, False, True]), boxes,
                                 ["gradcam-block5", DEFAULT_EXPLAINER])
    assert [s.method for s in scores] == ["gradcam-block5", DEFAULT_EXPLAINER]
    assert [s.chosen for s in scores] == [DEFAULT_EXPLAINER == "gradcam-block5", True]
    assert all(s.images == 3 and s.random_point == pytest.approx(random_point_share(BOXES, 64)) for s in scores)
    assert all(0.0 <= s.peak_in_box <= 1.0 and 0.0 <= s.mass_in_boxes <= 1.0 for s in scores)

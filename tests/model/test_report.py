"""report.html from synthetic scored images: every figure is in it, the page is one file that needs nothing else,
and headless chromium, opening it from disk with the network off, draws every figure."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage.localisation import LocalisationScore
from boneage.metrics import BundleRef, DataRef, evaluate_predictions
from boneage.report import GalleryCase, build_report, pick_gallery_cases
from helpers import headless_chromium

FIGURES = ("scatter", "bland-altman", "error-by-band", "gallery", "augmentation-preview")


def png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def scored(count: int = 40) -> pd.DataFrame:
    """``count`` scored images with true ages from 0 to 19 years, and one without a true age."""
    rng = np.random.default_rng(0)
    true = np.append(rng.uniform(0, 228, count), np.nan)
    return pd.DataFrame({"id": [f"case-{i}" for i in range(count + 1)], "sex": rng.choice(["M", "F"], count + 1),
                         "bone_age_months": np.nan_to_num(true, nan=100.0) + rng.normal(0, 8, count + 1),
                         "boneage": true, "path": ""})


def gallery(predictions: pd.DataFrame) -> list[GalleryCase]:
    rows = predictions.set_index("id")
    return [GalleryCase(case, kind, rows.at[case, "boneage"], rows.at[case, "bone_age_months"], rows.at[case, "sex"],
                        png(32, index), png(48, index + 100))
            for index, (kind, case) in enumerate(pick_gallery_cases(predictions, per_kind=2))]


@pytest.fixture
def report(tmp_path):
    predictions = scored()
    metrics = evaluate_predictions(predictions, training_mean=110.0, resamples=200, seed=0).with_sources(
        BundleRef("boneage:best", "/registry/boneage/3", "ab" * 32),
        DataRef(labels="labels.csv", images="images/", fingerprint="f" * 64), rejected=3,
        localisation=[LocalisationScore("gradcam", 40, 0.35, 0.2, 0.3, False),
                      LocalisationScore("hirescam-masked", 40, 0.85, 0.2, 0.6, True)])
    return build_report(metrics, predictions, gallery(predictions), png(64, 9), tmp_path)


def figure_html(page: str, figure_id: str) -> str:
    found = re.search(rf'<figure id="{figure_id}">(.*?)</figure>', page, re.S)
    assert found, f"no figure {figure_id}"
    return found.group(1)


def test_the_report_holds_every_figure_as_an_embedded_png(report):
    page = report.read_text()
    assert report.name == "report.html"
    for figure_id in FIGURES:
        sources = re.findall(r'<img src="([^"]+)"', figure_html(page, figure_id))
        assert sources, figure_id
        for source in sources:
            assert source.startswith("data:image/png;base64,")
            Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    assert len(re.findall("<img ", figure_html(page, "gallery"))) == 12  # 2 best, 2 median, 2 worst: image, overlay
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing to fetch
    assert "<script" not in page


def test_the_report_states_the_figures_with_units_and_sources(report):
    page = report.read_text()
    localisation = figure_html(page, "localisation")
    assert re.search(r'<tr class="chosen"><th>hirescam-masked</th><td>40</td><td>85%</td><td>20%</td><td>60%</td>',
                     localisation)
    assert "serving uses it" in localisation and localisation.count("serving uses it") == 1
    for fact in ("boneage:best", "ab" * 32, "f" * 64, "labels.csv", "Images rejected before scoring"):
        assert fact in page
    assert "MAE (months)" in page and "95% CI" in page and "the training mean, 110.0 months" in page
    assert "female" in page and "14-19 y" in page


def test_without_a_preview_or_localisation_the_report_says_so(tmp_path):
    predictions = scored(10)
    metrics = evaluate_predictions(predictions, 110.0, 50, 0)
    page = build_report(metrics, predictions, gallery(predictions), None, tmp_path).read_text()
    assert 'id="augmentation-preview"' not in page and "No augmentation preview" in page
    assert 'id="localisation"' not in page and "No localisation score" in page


def test_the_gallery_picks_the_best_median_and_worst_answers():
    predictions = pd.DataFrame({"id": list("abcdefg"), "bone_age_months": [10, 20, 30, 40, 50, 60, 0],
                                "boneage": [10, 25, 31, 10, 50, 10, np.nan]})  # |errors| 0, 5, 1, 30, 0, 50
    assert pick_gallery_cases(predictions, per_kind=1) == [("best", "a"), ("median", "c"), ("worst", "f")]
    assert pick_gallery_cases(predictions, per_kind=2) == [
        ("best", "a"), ("best", "e"), ("median", "c"), ("median", "b"), ("worst", "f"), ("worst", "d")]


# Per figure, the width of each of its images once the browser has decoded it (0 when it cannot).
DRAWN_WIDTHS = """figures => Promise.all(figures.map(async figure => [figure.id, await Promise.all(
    [...figure.querySelectorAll('img')].map(image => image.decode().then(() => image.naturalWidth, () => 0)))]))"""


def test_chromium_draws_every_figure_from_disk_without_the_network(report):
    requests, problems = [], []
    with headless_chromium() as browser:
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        drawn = page.eval_on_selector_all("figure", DRAWN_WIDTHS)
    assert requests == [report.as_uri()]  # the page itself, nothing else
    assert problems == []
    widths = dict(drawn)
    assert set(FIGURES) <= set(widths)
    for figure_id in FIGURES:
        assert widths[figure_id] and all(width > 0 for width in widths[figure_id]), (figure_id, widths[figure_id])


def test_a_set_without_true_ages_still_gives_a_report(tmp_path):
    predictions = scored(5).assign(boneage=np.nan)
    metrics = evaluate_predictions(predictions, 110.0, 50, 0)
    assert (metrics.counts.scored, metrics.counts.with_true_age, metrics.mae, metrics.mae_ci.low) == (6, 0, None, None)
    page = build_report(metrics, predictions, [], None, tmp_path).read_text()
    assert "No scored image had a true age" in page and "No Grad-CAM gallery" in page
    for figure_id in ("scatter", "bland-altman", "error-by-band"):
        assert "data:image/png;base64," in figure_html(page, figure_id)

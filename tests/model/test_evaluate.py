"""The evaluate job end to end on a tiny phantom run: metrics.json, predictions, report.html with every figure, the
localisation score on the phantoms' boxes, and the one-line refusals."""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy

import numpy as np
import pandas as pd
import pytest

from boneage.evaluate import NothingToEvaluate
from boneage.inference import DEFAULT_EXPLAINER
from boneage.train import run_training
from helpers import ROOT, train_config

pytestmark = pytest.mark.usefixtures("ray_session")

FIGURES = ("scatter", "bland-altman", "error-by-band", "gallery", "augmentation-preview", "localisation")


def evaluate_job(*overrides: str) -> list[str]:
    """jobs/evaluate.py's main with ``--set overrides``, in this process; the lines it printed."""
    main = runpy.run_path(str(ROOT / "jobs" / "evaluate.py"), run_name="imported")["main"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--config", str(ROOT / "configs" / "evaluate.yaml"), "--set", *overrides])
    return printed.getvalue().splitlines()


@pytest.fixture(scope="module")
def phantom_bundle(prepared_dir, tmp_path_factory):
    """A one-epoch model trained on the session's phantoms (in the driver: quick)."""
    return run_training(train_config(prepared_dir, tmp_path_factory.mktemp("evaluate"), "train.num_workers=0")).bundle


@pytest.fixture(scope="module")
def evaluation(phantom_bundle, prepared_dir, tmp_path_factory):
    """The evaluate job on the test split of the prepared phantoms: its output lines and its folder."""
    out = tmp_path_factory.mktemp("evaluation") / "eval"
    lines = evaluate_job(f"eval.bundle={phantom_bundle}", f"eval.data={prepared_dir}", "eval.split=test",
                         f"eval.out={out}", "eval.bootstrap_resamples=200", "eval.gallery_cases=1")
    return lines, out


def test_the_job_prints_the_report_path_last(evaluation):
    lines, out = evaluation
    assert lines[-1] == f"report: {out / 'report.html'}"
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()


def test_metrics_mae_is_that_of_the_written_predictions(evaluation, phantom_bundle):
    _, out = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(metrics)[0] == "mae"
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(predictions["bone_age_months"] - predictions["boneage"])))
    assert metrics["counts"]["scored"] == len(predictions) > 0
    assert metrics["bundle"]["reference"] == str(phantom_bundle)
    assert len(metrics["bundle"]["sha256"]) == 64 and len(metrics["data"]["fingerprint"]) == 64
    assert metrics["mae_ci"]["low"] <= metrics["mae"] <= metrics["mae_ci"]["high"]


def test_the_report_holds_every_figure_and_the_localisation_score(evaluation):
    _, out = evaluation
    html = (out / "report.html").read_text()
    for figure in FIGURES:
        assert re.search(rf'<figure[^>]*id="{figure}"', html), figure
    assert "http://" not in html and "https://" not in html  # self-contained
    localisation = json.loads((out / "metrics.json").read_text())["localisation"]
    assert {row["method"] for row in localisation} >= {DEFAULT_EXPLAINER}
    assert [row["method"] for row in localisation if row["chosen"]] == [DEFAULT_EXPLAINER]
    assert all(0 <= row["peak_in_box"] <= 1 and 0 < row["random_point"] < 1 for row in localisation)


def test_the_report_shows_the_figures_with_and_without_the_bias_correction_and_the_coverage(evaluation):
    _, out = evaluation  # the phantom bundle was exported by training: it carries trust signals
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = pd.read_csv(out / "predictions.csv")
    trust = metrics["trust"]
    raw_mae = np.mean(np.abs(predictions["bone_age_months_raw"] - predictions["boneage"]))
    assert trust["calibrated"] and trust["uncorrected"]["model"]["mae"] == pytest.approx(raw_mae)
    true = predictions["boneage"]
    held = (predictions["interval_low"] <= true) & (true <= predictions["interval_high"])
    assert trust["coverage"]["level"] == 0.9 and trust["coverage"]["overall"] == pytest.approx(held.mean())
    html = (out / "report.html").read_text()
    assert 'id="correction"' in html and 'id="coverage"' in html and "Prediction intervals at 90%" in html


def test_an_unlabelled_set_is_refused_in_one_line(phantom_bundle, phantom_dir, tmp_path):
    labels = tmp_path / "kaggle-test.csv"
    truth = pd.read_csv(phantom_dir / "boneage-training-dataset.csv").head(3)
    pd.DataFrame({"Case ID": truth["id"], "Sex": np.where(truth["male"], "M", "F")}).to_csv(labels, index=False)
    with pytest.raises(NothingToEvaluate, match="needs a labelled set") as refused:
        evaluate_job(f"eval.bundle={phantom_bundle}", f"eval.labels={labels}", f"eval.images={phantom_dir}",
                     "eval.data=", f"eval.out={tmp_path / 'eval'}")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "eval").exists()  # nothing half-written

"""The evaluation figures against values worked out by hand, the age bands at their edges, the seeded bootstrap,
and metrics.json written and read back."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from boneage.localisation import LocalisationScore
from boneage.metrics import (AGE_BANDS, Agreement, BundleRef, DataRef, ErrorStats, EvaluationMetrics, MetricsError,
                             age_band, bootstrap_mae_ci, error_stats, evaluate_predictions, limits_of_agreement)

# Errors (predicted - true) -2, 0, 6, 10, -20: |e| 2, 0, 6, 10, 20.
PREDICTED = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
TRUE = np.array([12.0, 20.0, 24.0, 30.0, 70.0])


def test_error_figures_match_the_hand_computed_values():
    stats = error_stats(PREDICTED, TRUE)
    assert stats.count == 5
    assert stats.mae == pytest.approx(38 / 5)
    assert stats.rmse == pytest.approx(math.sqrt((4 + 0 + 36 + 100 + 400) / 5))
    assert stats.median_ae == pytest.approx(6.0)
    assert stats.within_6 == pytest.approx(3 / 5)  # 2, 0 and exactly 6
    assert stats.within_12 == pytest.approx(4 / 5)
    assert stats.within_24 == pytest.approx(1.0)
    assert stats.bias == pytest.approx(-6 / 5)  # negative: the model says younger on average


def test_the_limits_of_agreement_are_the_bias_plus_minus_1_96_sample_sds():
    # Differences from their mean -1.2: -0.8, 1.2, 7.2, 11.2, -18.8; squares sum to 532.8, over n - 1 = 4.
    agreement = limits_of_agreement(PREDICTED, TRUE)
    sd = math.sqrt(532.8 / 4)
    assert (agreement.bias, agreement.low, agreement.high) == pytest.approx((-1.2, -1.2 - 1.96 * sd, -1.2 + 1.96 * sd))
    assert limits_of_agreement(PREDICTED[:1], TRUE[:1]) == Agreement(-2.0, -2.0, -2.0)


def test_an_empty_set_has_count_0_and_no_figures():
    assert error_stats(np.array([]), np.array([])) == ErrorStats(0, None, None, None, None, None, None, None)
    assert limits_of_agreement(np.array([]), np.array([])) == Agreement(None, None, None)
    interval = bootstrap_mae_ci(np.array([]), np.array([]), resamples=10, seed=3)
    assert (interval.low, interval.high, interval.resamples, interval.seed) == (None, None, 10, 3)


def test_age_bands_at_their_edges():
    months = [0, 23.99, 24, 24.01, 71.99, 72, 119.99, 120, 167.99, 168, 227.99, 228, 240]
    assert age_band(np.array(months)).tolist() == [
        "0-2 y", "0-2 y", "2-6 y", "2-6 y", "2-6 y", "6-10 y", "6-10 y", "10-14 y", "10-14 y", "14-19 y", "14-19 y",
        "14-19 y", "14-19 y"]
    assert [(band.low_months, band.high_months) for band in AGE_BANDS] == [
        (0, 24), (24, 72), (72, 120), (120, 168), (168, 228)]


def test_the_bootstrap_is_a_seeded_percentile_interval_around_the_mae():
    rng = np.random.default_rng(7)
    true = rng.uniform(0, 228, 50)
    predicted = true + rng.normal(0, 10, 50)
    first, again = bootstrap_mae_ci(predicted, true, seed=1), bootstrap_mae_ci(predicted, true, seed=1)
    other = bootstrap_mae_ci(predicted, true, seed=2)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)
    assert first.low < error_stats(predicted, true).mae < first.high
    assert (first.level, first.resamples, first.seed) == (0.95, 1000, 1)
    # The same draws, resampled one at a time, give the same interval.
    draws = np.random.default_rng(1).integers(0, 50, size=(1000, 50))
    means = [np.abs(predicted - true)[row].mean() for row in draws]
    assert (first.low, first.high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_identical_errors_give_a_zero_width_interval():
    interval = bootstrap_mae_ci(np.full(20, 13.0), np.full(20, 10.0), resamples=200, seed=0, level=0.9)
    assert (interval.low, interval.high, interval.level) == (pytest.approx(3.0), pytest.approx(3.0), 0.9)


def predictions() -> pd.DataFrame:
    """Six scored images: two girls and three boys with a true age, one image without."""
    return pd.DataFrame({"id": list("abcdef"), "sex": ["F", "F", "M", "M", "M", "F"],
                         "bone_age_months": [20.0, 30.0, 100.0, 150.0, 230.0, 50.0],
                         "boneage": [10.0, 24.0, 110.0, 150.0, 240.0, np.nan]})


def test_figures_by_sex_and_age_band_beside_the_training_mean():
    metrics = evaluate_predictions(predictions(), training_mean=100.0, resamples=50, seed=0)
    assert (metrics.counts.scored, metrics.counts.with_true_age) == (6, 5)
    assert metrics.mae == metrics.overall.model.mae == pytest.approx((10 + 6 + 10 + 0 + 10) / 5)
    assert metrics.overall.baseline.mae == pytest.approx((90 + 76 + 10 + 50 + 140) / 5)
    assert metrics.baseline_prediction_months == 100.0
    girls, boys = metrics.by_sex["F"], metrics.by_sex["M"]
    assert (girls.model.count, girls.model.mae, girls.model.bias) == (2, pytest.approx(8.0), pytest.approx(8.0))
    assert (boys.model.count, boys.model.mae, boys.baseline.mae) == (3, pytest.approx(20 / 3), pytest.approx(200 / 3))
    assert list(metrics.by_age_band) == [band.name for band in AGE_BANDS]
    bands = {name: comparison.model.count for name, comparison in metrics.by_age_band.items()}
    assert bands == {"0-2 y": 1, "2-6 y": 1, "6-10 y": 1, "10-14 y": 1, "14-19 y": 1}  # 24 months opens "2-6 y"
    assert metrics.by_age_band["14-19 y"].model.mae == pytest.approx(10.0)  # 240 months is in the last band


def test_a_band_without_images_is_kept_with_count_0():
    metrics = evaluate_predictions(predictions().iloc[:2], training_mean=100.0, resamples=50, seed=0)
    empty = metrics.by_age_band["10-14 y"]
    assert (empty.model.count, empty.model.mae, empty.baseline.within_12) == (0, None, None)
    assert metrics.by_sex["M"].model.count == 0


def test_predictions_without_the_needed_columns_are_refused():
    with pytest.raises(MetricsError, match="boneage"):
        evaluate_predictions(predictions().drop(columns="boneage"), 100.0, 10, 0)


def with_trust_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The predictions with raw answers 5 months younger and +/-7 month intervals, as a trusted bundle scores."""
    return table.assign(bone_age_months_raw=table["bone_age_months"] - 5, interval_low=table["bone_age_months"] - 7,
                        interval_high=table["bone_age_months"] + 7)


def test_trust_figures_give_the_uncorrected_errors_and_the_intervals_coverage():
    metrics = evaluate_predictions(with_trust_columns(predictions()), 100.0, 10, 0, calibrated=True,
                                   interval_level=0.9)
    trust = metrics.trust
    # served errors +10, +6, -10, 0, -10; raw ones 5 months lower: +5, +1, -15, -5, -15
    assert trust.calibrated and trust.uncorrected.model.mae == pytest.approx((5 + 1 + 15 + 5 + 15) / 5)
    assert trust.uncorrected.model.bias == pytest.approx(metrics.overall.model.bias - 5)
    assert trust.uncorrected_by_age_band["0-2 y"].model.mae == 5  # the 10-month girl: raw 15
    coverage = trust.coverage  # |served error| 10, 6, 10, 0, 10 against +/-7: 2 of 5 held
    assert coverage.level == 0.9 and coverage.overall == pytest.approx(2 / 5) and coverage.mean_width_months == 14
    assert coverage.by_sex == {"F": pytest.approx(1 / 2), "M": pytest.approx(1 / 3)}
    assert coverage.by_age_band == {"0-2 y": 0, "2-6 y": 1, "6-10 y": 0, "10-14 y": 1, "14-19 y": 0}
    assert evaluate_predictions(predictions(), 100.0, 10, 0).trust is None  # a bundle without trust signals


def test_metrics_json_round_trip_with_mae_first(tmp_path):
    scores = [LocalisationScore("gradcam", 40, 0.85, 0.3, 0.6, True),
              LocalisationScore("hirescam", 40, 0.7, 0.3, 0.5, False)]
    metrics = evaluate_predictions(predictions().iloc[:2], 100.0, 100, 4).with_sources(
        BundleRef("boneage:best", "/registry/boneage/3", "ab" * 32),
        DataRef(labels="labels.csv", images="images", fingerprint="f" * 64), rejected=2, localisation=scores)
    path = metrics.save(tmp_path)
    raw = json.loads(path.read_text())
    assert next(iter(raw)) == "mae"
    assert raw["by_age_band"]["6-10 y"]["model"] == {"count": 0, "mae": None, "rmse": None, "median_ae": None,
                                                     "within_6": None, "within_12": None, "within_24": None,
                                                     "bias": None}
    assert raw["counts"] == {"scored": 2, "with_true_age": 2, "rejected": 2}
    assert EvaluationMetrics.load(tmp_path) == metrics
    trusted = evaluate_predictions(with_trust_columns(predictions()), 100.0, 10, 0, True, 0.9)
    trusted.save(tmp_path / "trusted")
    assert EvaluationMetrics.load(tmp_path / "trusted") == trusted


def test_a_metrics_json_of_another_format_is_refused(tmp_path):
    evaluate_predictions(predictions(), 100.0, 10, 0).save(tmp_path)
    raw = json.loads((tmp_path / "metrics.json").read_text())
    (tmp_path / "metrics.json").write_text(json.dumps({**raw, "format": 99}))
    with pytest.raises(MetricsError, match="format 2"):
        EvaluationMetrics.load(tmp_path)

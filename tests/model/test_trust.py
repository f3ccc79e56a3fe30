"""Trust signals (issue 15): the bias correction's fit, round trip and application, and conformal coverage."""

import numpy as np
import pytest

from boneage.bundle import BundleMeta, load_bundle
from boneage.config import AnswerConfig
from boneage.inference import BoneAgePredictor
from boneage.metrics import AGE_BANDS, age_band
from boneage.trust import ConformalIntervals, LinearCalibration, TrustSignals
from helpers import make_bundle, regressed_to_the_mean

def test_the_calibration_recovers_a_known_line_and_undoes_regression_to_the_mean():
    predicted = np.linspace(10, 200, 50)
    line = LinearCalibration.fit(predicted, 5.0 + 1.25 * predicted)
    assert (line.slope, line.intercept) == pytest.approx((1.25, 5.0))
    assert line.apply(np.array([[0.0, 100.0]])) == pytest.approx(np.array([[5.0, 130.0]]))  # any shape
    predicted, true, male = regressed_to_the_mean(np.random.default_rng(0), 4000)
    signals = TrustSignals.fit(predicted, true, male)
    raw, corrected = signals.val_raw.by_age_band, signals.val_calibrated.by_age_band
    assert raw["0-2 y"].bias > 20 and raw["14-19 y"].bias < -20  # young read older, teenagers younger
    assert abs(corrected["0-2 y"].bias) < raw["0-2 y"].bias / 2 and abs(corrected["14-19 y"].bias) < 12
    assert signals.val_calibrated.overall.mae < signals.val_raw.overall.mae


def test_answers_that_do_not_vary_get_the_identity():
    assert LinearCalibration.fit(np.full(10, 100.0), np.arange(10.0)) == LinearCalibration(1.0, 0.0)


def test_conformal_coverage_on_synthetic_data_is_within_2_points_over_20_seeds():
    teen, teen_pooled = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        signals = TrustSignals.fit(*regressed_to_the_mean(rng, 4000))
        predicted, true, male = regressed_to_the_mean(rng, 4000)
        months = signals.calibration.apply(predicted)
        low, high = signals.intervals.interval(months, male, 0.9)
        covered = (low <= true) & (true <= high)
        assert covered.mean() == pytest.approx(0.9, abs=0.02), f"seed {seed}"
        teens = age_band(months) == "14-19 y"
        teen.append(covered[teens].mean())
        pooled = ConformalIntervals({"all": sorted(r for scores in signals.intervals.residuals.values()
                                                   for r in scores)})
        width = pooled.quantile("all", 0.9)
        teen_pooled.append((np.abs(true - months)[teens] <= width).mean())
    # Mondrian by band: teenagers get their own (wider) intervals; one pooled quantile under-covers them
    assert np.mean(teen) == pytest.approx(0.9, abs=0.02)
    assert np.mean(teen_pooled) < 0.85


def test_a_cell_with_few_residuals_borrows_its_band_then_all():
    residuals = {f"{band.name} {sex}": [] for band in AGE_BANDS for sex in "MF"}
    residuals["6-10 y M"] = [float(i) for i in range(1, 41)]  # 40: enough on its own
    residuals["6-10 y F"] = [100.0] * 5  # 5: borrows the band's 45
    intervals = ConformalIntervals(residuals)
    assert intervals.quantile("6-10 y M", 0.9) == 37.0  # ceil(41 * 0.9) = 37th smallest
    assert intervals.quantile("6-10 y F", 0.9) == sorted(residuals["6-10 y M"] + [100.0] * 5)[41]  # ceil(46 * .9)
    assert intervals.quantile("0-2 y F", 0.9) == intervals.quantile("6-10 y F", 0.9)  # all = the band's here
    assert intervals.quantile("0-2 y F", 0.99) == np.inf  # 45 residuals cannot give 99%


def test_trust_signals_round_trip_through_the_bundle_and_are_applied(tmp_path):
    predicted, true, male = regressed_to_the_mean(np.random.default_rng(1), 600)
    signals = TrustSignals.fit(predicted, true, male)
    folder, _ = make_bundle(tmp_path / "b", trust=signals)
    assert BundleMeta.load(folder).trust == signals
    bundle = load_bundle(folder)
    canvases, sexes = np.random.default_rng(2).integers(0, 255, (4, 64, 64), dtype=np.uint8), np.array([1, 0, 1, 0])
    sexes = sexes.astype(bool)
    calibrated = BoneAgePredictor(bundle)
    raw = BoneAgePredictor(bundle, AnswerConfig(calibrate=False))
    expected = signals.calibration.apply(raw.predict(canvases, sexes))
    assert np.allclose(calibrated.predict(canvases, sexes), expected) and calibrated.calibrated
    low, high = calibrated.interval(expected, sexes)
    assert np.all(low <= expected) and np.all(expected <= high) and np.all(high - low > 0)
    assert np.allclose(raw.interval(raw.predict(canvases, sexes), sexes)[1] - raw.predict(canvases, sexes),
                       signals.intervals_raw.half_width(raw.predict(canvases, sexes), sexes, 0.9))


def test_a_bundle_without_trust_signals_answers_raw_without_intervals(tmp_path):
    folder, _ = make_bundle(tmp_path / "b")
    predictor = BoneAgePredictor(load_bundle(folder))
    assert predictor.trust is None and not predictor.calibrated
    assert predictor.interval(np.array([100.0]), np.array([True])) is None

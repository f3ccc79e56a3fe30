"""How good a model's bone ages are: error figures beside the predict-the-training-mean baseline, by sex and by age
band, a bootstrap confidence interval for the MAE, and ``metrics.json`` (:class:`EvaluationMetrics`).

Pure numpy and pandas. Every error is ``predicted - true`` in months, so a positive bias means the model says
older than the truth. Groups (sexes, age bands) are formed by the *true* age. A group without images is kept with
count 0 and null figures, so every metrics.json has the same layout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from boneage.artifacts import write_json
from boneage.errors import JobError

if TYPE_CHECKING:
    from collections.abc import Sequence

METRICS_FILE = "metrics.json"
# The metrics.json layout this code writes and reads; renaming, removing or re-meaning a field needs a new one.
METRICS_FORMAT = 2  # 2: the trust figures (issue 15)
SEXES = ("M", "F")
WITHIN_MONTHS = (6, 12, 24)  # "within N months" counts |error| <= N
# Bootstrap resamples are drawn in blocks of at most this many indices, so memory stays flat on large sets.
_BOOTSTRAP_BLOCK = 1 << 22


@dataclass(frozen=True)
class AgeBand:
    """A range of true bone ages: ``low_months`` inclusive, ``high_months`` exclusive."""

    name: str
    low_months: float
    high_months: float


# The last band also takes ages of 228 months (19 years) and more, and the first any (impossible) negative age,
# so every image falls in exactly one band: 23.99 -> "0-2 y", 24 -> "2-6 y", 228 and 240 -> "14-19 y".
AGE_BANDS: tuple[AgeBand, ...] = (
    AgeBand("0-2 y", 0, 24),
    AgeBand("2-6 y", 24, 72),
    AgeBand("6-10 y", 72, 120),
    AgeBand("10-14 y", 120, 168),
    AgeBand("14-19 y", 168, 228),
)


def age_band(months: np.ndarray) -> np.ndarray:
    """The :data:`AGE_BANDS` name of each age in months (lower edge inclusive, upper exclusive)."""
    inner_edges = [band.low_months for band in AGE_BANDS[1:]]
    index = np.searchsorted(inner_edges, np.asarray(months, dtype=float), side="right")
    return np.array([band.name for band in AGE_BANDS], dtype=object)[index]


class MetricsError(JobError, ValueError):
    """A metrics.json this code cannot read, or predictions that cannot be scored."""


@dataclass
class ErrorStats:
    """Error figures of a set of predictions, in months (``within_*`` are shares 0..1); ``None`` when empty."""

    count: int
    mae: float | None
    rmse: float | None
    median_ae: float | None
    within_6: float | None
    within_12: float | None
    within_24: float | None
    bias: float | None  # mean of predicted - true: > 0 means the model says older


def error_stats(predicted: np.ndarray, true: np.ndarray) -> ErrorStats:
    """:class:`ErrorStats` of ``predicted`` against ``true`` (both in months, same length)."""
    error = np.asarray(predicted, dtype=float) - np.asarray(true, dtype=float)
    if error.size == 0:
        return ErrorStats(0, None, None, None, None, None, None, None)
    absolute = np.abs(error)
    within = [float(np.mean(absolute <= months)) for months in WITHIN_MONTHS]
    return ErrorStats(count=int(error.size), mae=float(absolute.mean()), rmse=float(np.sqrt(np.mean(error ** 2))),
                      median_ae=float(np.median(absolute)), within_6=within[0], within_12=within[1],
                      within_24=within[2], bias=float(error.mean()))


@dataclass
class Agreement:
    """Bland-Altman agreement of predicted with true ages, in months (``None`` when empty)."""

    bias: float | None  # mean of predicted - true
    low: float | None  # bias - z SD of the differences: the lower limit of agreement
    high: float | None


def limits_of_agreement(predicted: np.ndarray, true: np.ndarray, z: float = 1.96) -> Agreement:
    """The bias and the limits of agreement, bias +- ``z`` sample SDs of ``predicted - true`` (1.96: 95% of
    differences lie within them when they are normal)."""
    difference = np.asarray(predicted, dtype=float) - np.asarray(true, dtype=float)
    if difference.size == 0:
        return Agreement(None, None, None)
    spread = z * float(difference.std(ddof=1)) if difference.size > 1 else 0.0
    bias = float(difference.mean())
    return Agreement(bias, bias - spread, bias + spread)


@dataclass
class ConfidenceInterval:
    """A percentile bootstrap interval (``None`` bounds for an empty set)."""

    low: float | None
    high: float | None
    level: float  # e.g. 0.95
    resamples: int
    seed: int


def bootstrap_mae_ci(predicted: np.ndarray, true: np.ndarray, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> ConfidenceInterval:
    """Percentile bootstrap interval for the MAE: ``resamples`` resamples of the images with replacement, drawn
    by ``numpy.random.default_rng(seed)``, so the same inputs and seed give the same interval."""
    absolute = np.abs(np.asarray(predicted, dtype=float) - np.asarray(true, dtype=float))
    if absolute.size == 0:
        return ConfidenceInterval(None, None, level, resamples, seed)
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK // absolute.size)
    means = np.concatenate([absolute[rng.integers(0, absolute.size, size=(min(block, resamples - start),
                                                                              absolute.size))].mean(axis=1)
                            for start in range(0, resamples, block)])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return ConfidenceInterval(float(low), float(high), level, resamples, seed)


@dataclass
class Comparison:
    """The model's figures beside the baseline's (predicting the training mean for every image) on the same images."""

    model: ErrorStats
    baseline: ErrorStats


def compare(predicted: np.ndarray, true: np.ndarray, baseline_months: float) -> Comparison:
    """The model's :class:`ErrorStats` and the constant ``baseline_months`` prediction's on the same images."""
    true = np.asarray(true, dtype=float)
    return Comparison(error_stats(predicted, true), error_stats(np.full_like(true, baseline_months), true))


def compare_by_band(predicted: np.ndarray, true: np.ndarray, baseline_months: float) -> dict[str, Comparison]:
    """:func:`compare` within each age band of the true age, youngest first."""
    bands = age_band(true)
    return {band.name: compare(predicted[bands == band.name], true[bands == band.name], baseline_months)
            for band in AGE_BANDS}


@dataclass
class BundleRef:
    """The model that was evaluated."""

    reference: str  # as given (a folder, or <name>:<version>)
    path: str  # the bundle folder it resolved to
    sha256: str  # of its model.pt


@dataclass
class DataRef:
    """The images that were evaluated: labels and images, or a prepared folder and split."""

    labels: str = ""
    images: str = ""
    data: str = ""
    split: str = ""
    fingerprint: str = ""  # the prepared manifest's, or sha256 of the labels file and the image listing


@dataclass
class Counts:
    """How many images each figure stands on."""

    scored: int  # images the model answered
    with_true_age: int  # of those, the ones with a true age: the figures' images
    rejected: int  # images refused before scoring (the rejects file says why)


@dataclass
class Coverage:
    """How often the answers' prediction intervals hold the true age (shares 0..1; None for no images)."""

    level: float  # what they should hold
    overall: float | None
    by_sex: dict[str, float | None]
    by_age_band: dict[str, float | None]  # of the true age
    mean_width_months: float | None

    @classmethod
    def of(cls, known: pd.DataFrame, level: float) -> Coverage:
        """Coverage of rows with ``interval_low``, ``interval_high``, ``boneage`` (true) and ``sex``."""
        held = (known["interval_low"] <= known["boneage"]) & (known["boneage"] <= known["interval_high"])
        bands = age_band(known["boneage"].to_numpy(float))
        width = known["interval_high"] - known["interval_low"]
        return cls(level=level, overall=_mean(held), by_sex={sex: _mean(held[known["sex"] == sex]) for sex in SEXES},
                   by_age_band={band.name: _mean(held[bands == band.name]) for band in AGE_BANDS},
                   mean_width_months=_mean(width))


@dataclass
class TrustFigures:
    """What the bundle's trust signals did on this set: the figures without the bias correction, beside the
    served (corrected) ones, and the intervals' coverage."""

    calibrated: bool  # the served answers are bias-corrected
    uncorrected: Comparison | None  # the network's raw answers; None when nothing was corrected
    uncorrected_by_age_band: dict[str, Comparison]
    coverage: Coverage | None  # None when the bundle has no intervals

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrustFigures:
        """As :func:`dataclasses.asdict` wrote it."""
        return cls(calibrated=values["calibrated"],
                   uncorrected=_comparison(values["uncorrected"]) if values["uncorrected"] else None,
                   uncorrected_by_age_band={k: _comparison(v) for k, v in values["uncorrected_by_age_band"].items()},
                   coverage=Coverage(**values["coverage"]) if values["coverage"] else None)


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None


def trust_figures(known: pd.DataFrame, training_mean: float, calibrated: bool,
                  interval_level: float | None) -> TrustFigures:
    """:class:`TrustFigures` of scored rows with a true age (scoring's columns)."""
    true, raw = known["boneage"].to_numpy(float), known["bone_age_months_raw"].to_numpy(float)
    return TrustFigures(
        calibrated=calibrated, uncorrected=compare(raw, true, training_mean) if calibrated else None,
        uncorrected_by_age_band=compare_by_band(raw, true, training_mean) if calibrated else {},
        coverage=Coverage.of(known, interval_level) if interval_level is not None else None)


class LocalisationRow(Protocol):
    """What metrics.json keeps of a :class:`boneage.localisation.LocalisationScore` (a dataclass): one explainer's
    pointing-game figures on the phantom boxes."""

    method: str
    images: int
    peak_in_box: float
    random_point: float
    mass_in_boxes: float
    chosen: bool


@dataclass
class EvaluationMetrics:
    """``metrics.json``: a model's figures on one labelled set, with what they were computed from.

    ``mae`` comes first and is the MAE of exactly the answers the service would give for these images."""

    mae: float | None
    mae_ci: ConfidenceInterval
    overall: Comparison
    by_sex: dict[str, Comparison]  # "M", "F"
    by_age_band: dict[str, Comparison]  # AGE_BANDS names, youngest first
    baseline_prediction_months: float  # the training mean every baseline figure predicts
    counts: Counts
    bundle: BundleRef = field(default_factory=lambda: BundleRef("", "", ""))
    data: DataRef = field(default_factory=DataRef)
    localisation: list[LocalisationRow] = field(default_factory=list)  # dataclasses; empty off phantom data
    trust: TrustFigures | None = None  # None when the answers carried no trust signals
    format: int = METRICS_FORMAT

    def with_sources(self, bundle: BundleRef, data: DataRef, rejected: int,
                     localisation: Sequence[LocalisationRow] = ()) -> EvaluationMetrics:
        """A copy that says which model and data the figures came from, how many images were rejected, and the
        localisation scores (when the data has boxes)."""
        return dataclasses.replace(self, bundle=bundle, data=data, localisation=list(localisation),
                                   counts=dataclasses.replace(self.counts, rejected=rejected))

    def save(self, folder: str | Path) -> Path:
        """Write ``metrics.json`` into ``folder`` atomically."""
        return write_json(Path(folder) / METRICS_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> EvaluationMetrics:
        """Read ``metrics.json`` of ``folder``; localisation rows become
        :class:`boneage.localisation.LocalisationScore`."""
        path = Path(folder) / METRICS_FILE
        values = json.loads(path.read_text())
        if values.get("format") != METRICS_FORMAT or any(f.name not in values for f in dataclasses.fields(cls)):
            raise MetricsError(f"{path} is not a metrics.json of format {METRICS_FORMAT}: re-run the evaluation")
        row_type = _localisation_score() if values["localisation"] else None
        return cls(mae=values["mae"], mae_ci=ConfidenceInterval(**values["mae_ci"]),
                   overall=_comparison(values["overall"]),
                   by_sex={key: _comparison(value) for key, value in values["by_sex"].items()},
                   by_age_band={key: _comparison(value) for key, value in values["by_age_band"].items()},
                   baseline_prediction_months=values["baseline_prediction_months"],
                   counts=Counts(**values["counts"]), bundle=BundleRef(**values["bundle"]),
                   data=DataRef(**values["data"]), localisation=[row_type(**row) for row in values["localisation"]],
                   trust=TrustFigures.from_dict(values["trust"]) if values["trust"] else None)


def _localisation_score() -> type:
    """The localisation module's row type, imported only for a metrics.json that has rows: this module
    stays free of torch and the explainers."""
    from boneage.localisation import LocalisationScore

    return LocalisationScore


def _comparison(values: dict[str, Any]) -> Comparison:
    return Comparison(model=ErrorStats(**values["model"]), baseline=ErrorStats(**values["baseline"]))


def evaluate_predictions(predictions: pd.DataFrame, training_mean: float, resamples: int = 1000,
                         seed: int = 0, calibrated: bool = False,
                         interval_level: float | None = None) -> EvaluationMetrics:
    """The figures of scored images (columns ``sex`` "M"/"F", ``bone_age_months`` predicted, ``boneage`` true,
    NaN when unknown) beside predicting ``training_mean`` for every image. Rows without a true age are counted
    (``counts.scored - counts.with_true_age``) but not scored. With ``calibrated`` (``bone_age_months_raw`` holds
    the uncorrected answers) or an ``interval_level`` (``interval_low``/``interval_high`` hold the intervals),
    ``trust`` says what the bundle's trust signals did. Fill in the sources with
    :meth:`EvaluationMetrics.with_sources`."""
    missing = {"sex", "bone_age_months", "boneage"} - set(predictions.columns)
    if missing:
        raise MetricsError(f"the predictions lack the column(s) {', '.join(sorted(missing))}")
    known = predictions[predictions["boneage"].notna()]
    predicted, true = known["bone_age_months"].to_numpy(float), known["boneage"].to_numpy(float)
    sexes = known["sex"].to_numpy()
    overall = compare(predicted, true, training_mean)
    return EvaluationMetrics(
        mae=overall.model.mae, mae_ci=bootstrap_mae_ci(predicted, true, resamples, seed), overall=overall,
        by_sex={sex: compare(predicted[sexes == sex], true[sexes == sex], training_mean) for sex in SEXES},
        by_age_band=compare_by_band(predicted, true, training_mean),
        baseline_prediction_months=float(training_mean),
        counts=Counts(scored=len(predictions), with_true_age=len(known), rejected=0),
        trust=trust_figures(known, training_mean, calibrated, interval_level)
        if calibrated or interval_level is not None else None)

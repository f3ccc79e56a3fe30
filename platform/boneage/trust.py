"""Trust signals a bundle carries with its weights: a bias correction and prediction intervals (issue 15).

Both are fitted on the validation split when a bundle is exported, never on the test split, and applied the same
way wherever the bundle answers (the service, bulk prediction, evaluation):

- :class:`LinearCalibration` undoes regression to the mean (young children read older, teenagers younger): the
  least-squares line of the true age on the predicted one.
- :class:`ConformalIntervals` are split-conformal intervals, Mondrian by age band and sex of the corrected answer:
  each cell keeps its own validation residuals, so infants do not borrow teenagers' errors. An interval at level
  ``L`` covers the true age of a new image of that cell with probability at least ``L`` (exchangeability).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from boneage.metrics import AGE_BANDS, SEXES, ErrorStats, age_band, error_stats

# A Mondrian cell with fewer validation residuals than this borrows its age band's (both sexes), and a band with
# fewer borrows every residual: a quantile of a handful of residuals is mostly noise.
MIN_CELL_RESIDUALS = 30


@dataclass
class LinearCalibration:
    """Corrected age = ``intercept + slope * predicted`` (months): the least-squares fit of true on predicted."""

    slope: float = 1.0
    intercept: float = 0.0

    @classmethod
    def fit(cls, predicted: np.ndarray, true: np.ndarray) -> LinearCalibration:
        """The fit on validation answers; the identity when they barely vary (nothing to correct with)."""
        predicted, true = np.asarray(predicted, dtype=float), np.asarray(true, dtype=float)
        if predicted.size < 2 or predicted.std() < 1e-6:
            return cls()
        slope, intercept = np.polyfit(predicted, true, 1)
        return cls(slope=float(slope), intercept=float(intercept))

    def apply(self, months: np.ndarray) -> np.ndarray:
        """Corrected ages of raw answers ``months`` (any shape)."""
        return self.intercept + self.slope * np.asarray(months, dtype=float)


def mondrian_cell(months: np.ndarray, male: np.ndarray) -> np.ndarray:
    """The Mondrian cell of each answer: ``"<age band> <M|F>"``, from the corrected answer, not the unknown truth."""
    sex = np.where(np.asarray(male, dtype=bool), "M", "F")
    return np.array([f"{band} {s}" for band, s in zip(age_band(months), sex)], dtype=object)


@dataclass
class ConformalIntervals:
    """Sorted absolute validation residuals (months) of a bundle's answers, per Mondrian cell of the answer."""

    residuals: dict[str, list[float]]  # cell ("6-10 y M") -> sorted |true - answer|

    @classmethod
    def fit(cls, answers: np.ndarray, true: np.ndarray, male: np.ndarray) -> ConformalIntervals:
        """The residuals of validation answers, by cell (rounded to 0.01 month: the file stays small)."""
        errors = np.abs(np.asarray(true, dtype=float) - np.asarray(answers, dtype=float))
        cells = mondrian_cell(answers, male)
        return cls({cell: sorted(round(float(e), 2) for e in errors[cells == cell]) for cell in _all_cells()})

    def half_width(self, months: np.ndarray, male: np.ndarray, level: float) -> np.ndarray:
        """The interval's half width for each answer at ``level`` (0.5-0.99); inf where even all residuals are
        too few for that level."""
        cells = mondrian_cell(months, male)
        widths = {cell: self.quantile(cell, level) for cell in set(cells)}
        return np.array([widths[cell] for cell in cells], dtype=float)

    def interval(self, months: np.ndarray, male: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` months around each answer, at ``level``; low is never below 0."""
        months = np.asarray(months, dtype=float)
        width = self.half_width(months, male, level)
        return np.maximum(months - width, 0.0), months + width

    def quantile(self, cell: str, level: float) -> float:
        """The cell's conformal quantile; from its band's residuals (both sexes), or all of them, when too few."""
        band = cell.rsplit(" ", 1)[0]
        for pool in (lambda: self.residuals.get(cell, []), lambda: _merged(self.residuals, f"{band} ")):
            scores = pool()  # merged (and sorted) only when the cell alone is too small: this runs per request
            if len(scores) >= MIN_CELL_RESIDUALS and conformal_rank(len(scores), level) <= len(scores):
                return float(scores[conformal_rank(len(scores), level) - 1])
        everything = _merged(self.residuals, "")
        rank = conformal_rank(len(everything), level)
        return float(everything[rank - 1]) if rank <= len(everything) else math.inf

    def counts(self) -> dict[str, int]:
        """How many validation residuals each cell holds."""
        return {cell: len(scores) for cell, scores in self.residuals.items()}


def conformal_rank(n: int, level: float) -> int:
    """Split conformal's order statistic: the ceil((n + 1) level)-th smallest of n residuals."""
    return math.ceil((n + 1) * level - 1e-9)  # (9 + 1) * 0.9 is 9.000000000000002 in floating point


def _merged(residuals: dict[str, list[float]], prefix: str) -> list[float]:
    """The residuals of every cell whose name starts with ``prefix``, sorted."""
    return sorted(score for cell, scores in residuals.items() if cell.startswith(prefix) for score in scores)


def _all_cells() -> list[str]:
    return [f"{band.name} {sex}" for band in AGE_BANDS for sex in SEXES]


@dataclass
class BandErrors:
    """Validation MAE and bias (months), overall and per age band of the true age."""

    overall: ErrorStats
    by_age_band: dict[str, ErrorStats] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BandErrors:
        """The figures as :func:`dataclasses.asdict` wrote them."""
        return cls(ErrorStats(**values["overall"]),
                   {band: ErrorStats(**stats) for band, stats in values["by_age_band"].items()})

    @classmethod
    def of(cls, predicted: np.ndarray, true: np.ndarray) -> BandErrors:
        """The figures of ``predicted`` against ``true``."""
        bands = age_band(true)
        return cls(error_stats(predicted, true),
                   {band.name: error_stats(predicted[bands == band.name], true[bands == band.name])
                    for band in AGE_BANDS})


@dataclass
class TrustSignals:
    """What a bundle says about how far to trust its answers, fitted on its validation split."""

    calibration: LinearCalibration
    intervals: ConformalIntervals  # around corrected answers
    intervals_raw: ConformalIntervals  # around raw answers, for a predictor with the calibration turned off
    val_raw: BandErrors  # the bundle's answers as the network gives them
    val_calibrated: BandErrors  # after the calibration

    @classmethod
    def fit(cls, predicted: np.ndarray, true: np.ndarray, male: np.ndarray) -> TrustSignals:
        """Fit both signals on validation answers ``predicted`` (raw, months), true ages and sexes."""
        predicted, true = np.asarray(predicted, dtype=float), np.asarray(true, dtype=float)
        calibration = LinearCalibration.fit(predicted, true)
        corrected = calibration.apply(predicted)
        return cls(calibration=calibration, intervals=ConformalIntervals.fit(corrected, true, male),
                   intervals_raw=ConformalIntervals.fit(predicted, true, male),
                   val_raw=BandErrors.of(predicted, true), val_calibrated=BandErrors.of(corrected, true))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrustSignals:
        """The signals as :func:`dataclasses.asdict` wrote them into ``bundle.json``."""
        return cls(calibration=LinearCalibration(**values["calibration"]),
                   intervals=ConformalIntervals(values["intervals"]["residuals"]),
                   intervals_raw=ConformalIntervals(values["intervals_raw"]["residuals"]),
                   val_raw=BandErrors.from_dict(values["val_raw"]),
                   val_calibrated=BandErrors.from_dict(values["val_calibrated"]))

    def summary(self, calibrated: bool, level: float) -> dict[str, Any]:
        """What ``/v1/model`` shows: the correction, the intervals' half widths per cell at ``level`` (of the
        answers as served: corrected or raw) and the validation figures both ways."""
        intervals = self.intervals if calibrated else self.intervals_raw
        widths = {cell: intervals.quantile(cell, level) for cell in intervals.residuals}
        return {"calibration": dataclasses.asdict(self.calibration), "applied": calibrated, "interval_level": level,
                "interval_half_width_months": {cell: round(w, 2) if math.isfinite(w) else None
                                               for cell, w in widths.items()},
                "validation_residuals": intervals.counts(),
                "val_raw": dataclasses.asdict(self.val_raw), "val_calibrated": dataclasses.asdict(self.val_calibrated)}

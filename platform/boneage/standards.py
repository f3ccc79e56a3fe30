"""Greulich & Pyle reference: how a bone age compares with children of the same sex and chronological age.

The Brush Foundation table (package data, see ``resources/README.md``) gives the mean bone age and its SD at each
chronological age; both are interpolated linearly between rows. ``SDS = (bone_age - mean) / sd``. Within +/-2 SD is
"normal", below "delayed", above "advanced"; outside the table's age range the determination is "indeterminate".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

NORMAL_LIMIT_SDS = 2.0
MAX_AGE_MONTHS = 240.0  # what the service accepts as a chronological age


@dataclass(frozen=True)
class Assessment:
    """A bone age set against the reference for the child's sex and chronological age."""

    sds: float | None  # None when the age is outside the table
    determination: str  # delayed | normal | advanced | indeterminate
    reference_mean_months: float | None
    reference_sd_months: float | None


@lru_cache(maxsize=None)
def reference_table() -> dict[str, np.ndarray]:
    """``{"M": rows, "F": rows}``, each row (chronological age, mean bone age, SD) in months, ages ascending."""
    text = resources.files("boneage").joinpath("resources/greulich-pyle-brush-foundation.csv").read_text()
    rows: dict[str, list[tuple[float, float, float]]] = {"M": [], "F": []}
    for row in csv.DictReader(text.splitlines()):
        rows[row["sex"]].append((float(row["chronological_age_months"]), float(row["mean_bone_age_months"]),
                                 float(row["sd_months"])))
    return {sex: np.array(sorted(values)) for sex, values in rows.items()}


def assess(bone_age_months: float, sex: str, chronological_age_months: float) -> Assessment:
    """The SDS and determination of a bone age for a child of ``sex`` (``M``/``F``) at a chronological age."""
    table = reference_table()[sex]
    ages, means, sds = table[:, 0], table[:, 1], table[:, 2]
    if not ages[0] <= chronological_age_months <= ages[-1]:
        return Assessment(None, "indeterminate", None, None)
    mean = float(np.interp(chronological_age_months, ages, means))
    sd = float(np.interp(chronological_age_months, ages, sds))
    score = (bone_age_months - mean) / sd
    if score < -NORMAL_LIMIT_SDS:
        determination = "delayed"
    elif score > NORMAL_LIMIT_SDS:
        determination = "advanced"
    else:
        determination = "normal"
    return Assessment(round(score, 2), determination, round(mean, 2), round(sd, 2))


def years_and_months(months: float) -> str:
    """``125.6`` -> ``"10 years 6 months"`` (rounded to the nearest month)."""
    total = max(0, round(months))
    years, rest = divmod(total, 12)
    parts = []
    if years:
        parts.append(f"{years} year{'s' * (years != 1)}")
    if rest or not years:
        parts.append(f"{rest} month{'s' * (rest != 1)}")
    return " ".join(parts)

"""Deterministic train/val/test splits, stratified by sex and age band.

Within each stratum (sex x ``age_band_months`` band) the rows are ordered by a SHA-256 hash of their id and cut
at the requested fractions. The result depends only on the ids and labels, never on row order, process, machine
or Python's hash seed, and every stratum is split in the same proportions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

TRAIN, VAL, TEST, UNLABELED = "train", "val", "test", "unlabeled"


def id_hash(image_id: str) -> int:
    """A stable 64-bit integer from an id (the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")


def assign_splits(table: pd.DataFrame, val_fraction: float, test_fraction: float,
                  age_band_months: int) -> pd.Series:
    """The split name of each row of ``table`` (columns ``id``, ``male``, ``boneage``), index-aligned."""
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must leave rows for training, got "
                         f"{val_fraction} + {test_fraction}")
    splits = pd.Series(TRAIN, index=table.index, dtype=object)
    if table.empty:
        return splits
    band = (table["boneage"] // age_band_months).astype(int)
    order = table.assign(_band=band, _hash=table["id"].map(id_hash)).sort_values("_hash", kind="stable")
    for _, stratum in order.groupby(["male", "_band"], sort=False):
        # The centre of each row's slot in the stratum, in (0, 1): cut points give exact proportions.
        position = (np.arange(len(stratum)) + 0.5) / len(stratum)
        names = np.where(position < test_fraction, TEST,
                         np.where(position < test_fraction + val_fraction, VAL, TRAIN))
        splits.loc[stratum.index] = names
    return splits

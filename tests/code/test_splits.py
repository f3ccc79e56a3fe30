"""Deterministic, stratified splits."""

import numpy as np
import pandas as pd
import pytest

from boneage.splits import assign_splits, id_hash


def table(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": [str(1000 + i) for i in range(n)], "male": rng.random(n) < 0.54,
                         "boneage": rng.uniform(1, 228, n).round()})


def test_id_hash_is_the_same_on_every_machine():
    # SHA-256 based, never Python's salted hash(): a changed value would silently reshuffle every split.
    assert id_hash("1377") == 0x2A1D1388F992DBCA


def test_splits_do_not_depend_on_row_order():
    rows = table(2000)
    first = assign_splits(rows, 0.15, 0.15, 24)
    shuffled = rows.sample(frac=1.0, random_state=1)
    second = assign_splits(shuffled, 0.15, 0.15, 24)
    assert (first == second.reindex(first.index)).all()


def test_every_stratum_is_split_in_the_requested_proportions():
    rows = table(3000)
    rows["split"] = assign_splits(rows, 0.2, 0.1, 24)
    rows["band"] = rows["boneage"] // 24
    for _, stratum in rows.groupby(["male", "band"]):
        n = len(stratum)
        shares = stratum["split"].value_counts()
        assert abs(shares.get("val", 0) - 0.2 * n) <= 1
        assert abs(shares.get("test", 0) - 0.1 * n) <= 1


def test_zero_fractions_put_everything_in_train_and_bad_fractions_fail():
    rows = table(50)
    assert set(assign_splits(rows, 0.0, 0.0, 24)) == {"train"}
    with pytest.raises(ValueError, match="leave rows for training"):
        assign_splits(rows, 0.5, 0.5, 24)

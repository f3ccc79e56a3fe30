"""The prepared image column round-trips exactly; a missing split is named with the ones that exist, and a folder
in the old layout says to rerun the prepare job."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from boneage.dataset import (MANIFEST, OLD_LAYOUT_MANIFEST, OldPreparedLayout, image_column, images_from_column,
                             load_split, read_manifest, read_split, split_path)
from helpers import ROOT

WITHOUT_RAY = """
import json, sys
sys.modules["ray"] = None  # any import of ray or ray.* now raises ImportError
from boneage.dataset import load_split
split = load_split(sys.argv[1], "val")
print(json.dumps({"boneage": split["boneage"].tolist(), "male": split["male"].tolist(),
                  "image": list(split["image"].shape), "pixels": int(split["image"].sum())}))
"""


def test_image_column_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    column = image_column(images)
    assert len(column) == 5 and column.type.byte_width == 64
    assert np.array_equal(images_from_column(column, 8), images)  # from Arrow
    assert np.array_equal(images_from_column(column.to_numpy(zero_copy_only=False), 8), images)  # from a batch


def test_reading_a_missing_split_names_the_existing_ones(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"image_size": 8}))
    split_path(tmp_path, "train").mkdir()
    split_path(tmp_path, "val").mkdir()
    for read in (read_split, load_split):
        with pytest.raises(FileNotFoundError, match="no 'test' split; its splits are: train, val"):
            read(tmp_path, "test")


def test_a_folder_in_the_old_layout_says_to_rerun_prepare(tmp_path):
    (tmp_path / OLD_LAYOUT_MANIFEST).write_text(json.dumps({"image_size": 8}))
    (tmp_path / "train").mkdir()
    for read in (read_manifest, lambda root: read_split(root, "train"), lambda root: load_split(root, "train")):
        with pytest.raises(OldPreparedLayout, match=r"prepared by an older version.*rerun jobs/prepare.py"):
            read(tmp_path)


def test_a_folder_that_is_not_prepared_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset.*run jobs/prepare.py") as raised:
        read_split(tmp_path, "train")
    assert not isinstance(raised.value, OldPreparedLayout)


def test_load_split_reads_every_row_without_ray(prepared_dir):
    """A GPU box without Ray reads a split whole: the same rows, in file order, as the Parquet files hold."""
    out = subprocess.run([sys.executable, "-c", WITHOUT_RAY, str(prepared_dir)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    split = json.loads(out.stdout)
    table = pq.read_table(split_path(prepared_dir, "val"), columns=["image", "boneage", "male"])
    assert len(table) == read_manifest(prepared_dir)["splits"]["counts"]["val"]
    assert np.array_equal(np.float32(split["boneage"]), table["boneage"].to_numpy().astype(np.float32))
    assert np.array_equal(split["male"], table["male"].to_numpy().astype(float))
    assert split["image"] == [len(table), 1, 32, 32]
    assert split["pixels"] == int(images_from_column(table["image"], 32).sum(dtype=np.int64))

"""The prepared image column round-trips exactly, and a missing split is named with the ones that exist."""

import numpy as np
import pytest

from boneage.dataset import image_column, images_from_column, read_split


def test_image_column_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    column = image_column(images)
    assert len(column) == 5 and column.type.byte_width == 64
    assert np.array_equal(images_from_column(column, 8), images)  # from Arrow
    assert np.array_equal(images_from_column(column.to_numpy(zero_copy_only=False), 8), images)  # from a batch


def test_reading_a_missing_split_names_the_existing_ones(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no 'test' split; its splits are: train, val"):
        read_split(tmp_path, "test")

"""Paths and small builders shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from boneage.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
THUMBS = SHARED_DATA / "rsna-thumbs"
FULLSIZE = SHARED_DATA / "rsna-fullsize"


def require(path: Path) -> Path:
    """Skip the test, saying why, when the real RSNA samples beside the project are absent."""
    if not path.exists():
        pytest.skip(f"real RSNA samples not found at {path} (they sit beside the project in CI)")
    return path


def data_config(labels, images, out, *extra: str) -> Config:
    """A config reading ``labels``/``images`` into ``out`` at 32 px (tiny: fast on 2 cores)."""
    return load_config(overrides=[f"data.labels={labels}", f"data.images={images}", f"data.out={out}",
                                  "data.image_size=32", *extra])


def train_config(prepared: Path, work: Path, *extra: str) -> Config:
    """A tiny, quick training config on a prepared dataset, writing runs and bundles under ``work``."""
    return load_config(overrides=[
        f"data.out={prepared}", "model.head=[16]", "model.dropout=0", "model.sex_embedding=4",
        "train.batch_size=8", "train.epochs=1", "train.num_workers=1", "train.threads_per_worker=1",
        "train.shuffle_buffer=16", f"train.storage_path={work / 'runs'}", f"registry.root={work / 'registry'}",
        *extra])

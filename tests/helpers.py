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

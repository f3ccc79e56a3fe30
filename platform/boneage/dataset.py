"""Reading a prepared dataset: where its parts live, its manifest, its splits (as Ray Datasets, or as tensors
without Ray), and the image column: raw uint8 pixels, one fixed-size binary value per image.

The folder layout (written by :mod:`boneage.prepare`) is known here only::

    split=train/*.parquet  split=val/*.parquet  split=test/*.parquet   (or split=unlabeled/)
    _manifest.json  _rejects.csv  _config.yaml

The split folders are hive-style partitions, so a standard reader of the root (``pyarrow.dataset.dataset(root,
partitioning="hive")``, ``pandas.read_parquet(root)``, ``ray.data.read_parquet(root)``) gives every row with its
``split``; the metadata names start with ``_``, which those readers skip. ``split`` lives in the folder names only:
a ``split`` column inside the files as well makes ``pandas.read_parquet`` fail (a string column against pyarrow's
dictionary-typed partition field).

Parquet stores a fixed-size binary column as one value per row, so reading an epoch is a bulk copy; a nested
list-of-pixels column (Ray's tensor type) costs one Parquet value per pixel and reads about 20x slower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from boneage.errors import JobError

if TYPE_CHECKING:
    import pandas as pd
    import ray.data
    import torch

SPLIT_COLUMN = "split"
MANIFEST = "_manifest.json"
REJECTS = "_rejects.csv"
CONFIG = "_config.yaml"
OLD_LAYOUT_MANIFEST = "manifest.json"  # beside train/ val/ test/ folders, before prepare version 3


class OldPreparedLayout(JobError, FileNotFoundError):
    """The folder was prepared in the layout before hive-style split folders: the prepare job rebuilds it."""


def split_path(root: str | Path, split: str) -> Path:
    """The folder of one split's Parquet parts: a hive-style ``split=<name>`` partition of ``root``."""
    return Path(root) / f"{SPLIT_COLUMN}={split}"


def split_names(root: str | Path) -> list[str]:
    """The splits a prepared folder holds, sorted."""
    prefix = f"{SPLIT_COLUMN}="
    return sorted(p.name.removeprefix(prefix) for p in Path(root).glob(f"{prefix}*") if p.is_dir())


class DatasetNotPrepared(JobError, FileNotFoundError):
    """The folder a job reads as a prepared dataset (``data.out``) was never prepared."""


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset folder; :class:`DatasetNotPrepared` when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        if (Path(folder) / OLD_LAYOUT_MANIFEST).is_file():
            raise OldPreparedLayout(f"{folder} was prepared by an older version (train/ val/ folders, no "
                                    f"{MANIFEST}); rerun jobs/prepare.py with the same settings to rebuild it")
        raise DatasetNotPrepared(f"data.out={folder} is not a prepared dataset (no {MANIFEST}): run "
                                 "jobs/prepare.py with the same data settings first")
    return json.loads(path.read_text())


def image_column(images: np.ndarray) -> pa.FixedSizeBinaryArray:
    """``(N, H, W)`` uint8 images as an Arrow column of N values of H*W bytes each (no per-pixel overhead)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    count, height, width = images.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(height * width), count, [None, pa.py_buffer(images)])


def images_from_column(values, image_size: int) -> np.ndarray:
    """The inverse of :func:`image_column` for a batch: ``(N, image_size, image_size)`` uint8.

    ``values`` is what Ray Data hands a numpy batch (an object array of ``bytes``) or an Arrow array.
    """
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_numpy(zero_copy_only=False)
    flat = np.frombuffer(bytearray().join(values), dtype=np.uint8)  # one copy, writable (torch needs that)
    return flat.reshape(len(values), image_size, image_size)


def batch_tensors(columns, image_size: int) -> dict[str, torch.Tensor]:
    """Rows of a prepared split (``image``, ``boneage``, ``male`` columns: numpy or Arrow) -> the batch layout the
    training step takes: image (N, 1, S, S) uint8, boneage (N,) float32 months, male (N,) float32."""
    import torch  # here, not at the top: the prepare job and its decode tasks import this module and need no torch

    return {"image": torch.from_numpy(images_from_column(columns["image"], image_size)).unsqueeze(1),
            "boneage": torch.from_numpy(np.asarray(columns["boneage"]).astype(np.float32)),  # a writable copy
            "male": torch.from_numpy(np.asarray(columns["male"]).astype(np.float32))}


def read_split(root: str | Path, split: str) -> ray.data.Dataset:
    """One split (``train``, ``val``, ``test`` or ``unlabeled``) of a prepared dataset as a Ray Dataset, with the
    ``split`` column (a string, from the folder name)."""
    import ray.data  # here, not at the top: the column helpers above also run where Ray is not installed
    from ray.data.datasource import Partitioning

    path = _existing_split_path(root, split)
    context = quiet_context()
    context.execution_options.preserve_order = True  # rows in file order: the same seed gives the same batches
    # Ray Data's V2 Parquet reader lists files by starting 32 footer-reader actors (processes) for every read: 3-5 s
    # and 32 process starts per read on a 2-core machine, against 0.2 s for the V1 reader. A split is a few local
    # files whose footers need no pool (bench/read_split.py).
    context.use_datasource_v2 = False
    with ray.data.DataContext.current(context):  # a dataset keeps the context it was created in
        # base_dir: only the split folder is a partition, not a "key=value" folder above the dataset
        return ray.data.read_parquet(str(path), partitioning=Partitioning("hive", base_dir=str(path.parent)))


def load_split(root: str | Path, split: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One split read whole, without Ray, as tensors on ``device``: ``image`` (N, 1, S, S) uint8, ``boneage``
    (N,) float32 months, ``male`` (N,) float32. For in-memory loops: benchmarks, and GPU boxes without Ray."""
    image_size = read_manifest(root)["image_size"]  # first: a folder that is not a prepared dataset says so
    table = pq.read_table(_existing_split_path(root, split), columns=["image", "boneage", "male"])
    batch = batch_tensors(table, image_size)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def prepared_rows(root: str | Path, split: str) -> pd.DataFrame:
    """A prepared split's rows (``id``, ``image`` bytes, ``boneage``, ``male``), in file order, without Ray."""
    return pq.read_table(_existing_split_path(root, split), columns=["id", "image", "boneage", "male"]).to_pandas()


def _existing_split_path(root: str | Path, split: str) -> Path:
    """:func:`split_path`, checked: a missing split is named with the ones that exist, and a folder that is not
    a prepared dataset (or was prepared in the old layout) says what to do."""
    path = split_path(root, split)
    if not path.is_dir():
        read_manifest(root)
        raise FileNotFoundError(f"{root} has no '{split}' split; its splits are: {', '.join(split_names(root))}")
    return path


def quiet_context() -> ray.data.DataContext:
    """Ray Data settings for this platform's datasets: no progress bars or start banners, which flood job logs
    (every job logs its own readable progress lines instead)."""
    from ray.data import DataContext

    context = DataContext.get_current().copy()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return context

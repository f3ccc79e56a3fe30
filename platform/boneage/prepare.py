"""The prepare job: labels + images -> validated, split, decoded, resized Parquet that Ray Train streams.

Output folder ``data.out`` (the layout: :mod:`boneage.dataset`)::

    split=train/*.parquet  split=val/*.parquet  split=test/*.parquet   columns: id, image (HxW uint8 bytes),
                                                                       boneage, male; split from the folder name
    _manifest.json   counts, label statistics, preprocessing, source hashes, code version, input fingerprint
    _rejects.csv     id, path, reason: every row or file left out, and why
    _config.yaml     the fully resolved config of the run

Decoding runs in parallel with Ray Data ``map_batches``. The folder is built in a temporary sibling and renamed
into place, so a failed run never leaves a half-written dataset. When the inputs, settings and preprocessing are
unchanged since the last run, the existing folder is reused.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import DataContext, Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import WriteResult

from boneage.artifacts import (atomic_directory, code_version, disk_full_reported, file_listing, sha256_file,
                               sha256_json, write_json)
from boneage.config import Config, DataConfig, Role, save_config, values_with
from boneage.dataset import (CONFIG, MANIFEST, REJECTS, SPLIT_COLUMN, image_column, quiet_context, read_manifest,
                             split_path)
from boneage.errors import JobError
from boneage.imaging import PREPROCESSING, REJECT_UNDECODABLE, ImageRejected, load_radiograph
from boneage.rsna import (REJECT_COLUMNS, REJECT_DUPLICATE_ID, LabelsError, LabelTable, read_labels, reject_counts,
                          unlabeled_image_rejects)
from boneage.splits import TEST, UNLABELED, assign_splits

log = logging.getLogger(__name__)

# Bump when decoding, resizing or the output layout change: older prepared folders are then rebuilt.
# 3: hive-style split=<name>/ folders, split only in the folder name, metadata files named _*.
PREPARE_VERSION = 3
PART_COLUMNS = ["id", "image", "boneage", "male"]  # and split, from the folder name
MIN_DECODE_TASKS = 8


class TooManyRejects(JobError, RuntimeError):
    """More rows were rejected than ``data.max_reject_fraction`` allows."""


@dataclass
class Rows:
    """The usable rows with their split, everything rejected so far, and where they came from."""

    table: pd.DataFrame  # id, path, boneage, male, source, split
    rejects: pd.DataFrame  # id, path, reason
    sources: list[LabelTable]

    @property
    def total(self) -> int:
        return len(self.table) + len(self.rejects)


def prepare_dataset(cfg: Config) -> Path:
    """Build (or reuse) the prepared dataset described by ``cfg.data``; return its folder."""
    data = cfg.data
    rows = collect_rows(data)
    sources = [_describe_source(s) for s in rows.sources]
    fingerprint = input_fingerprint(data, sources)
    out = Path(data.out)
    if _is_current(out, fingerprint):
        log.info("up to date: %s (inputs and settings unchanged; reusing it)", out)
        return out
    _check_reject_fraction(rows.rejects, rows.total, data, out)  # fail before decoding anything

    log.info("decoding %d images at %d px with Ray Data", len(rows.table), data.image_size)
    full = disk_full_reported("the prepared dataset", out, "the prepared dataset already there (if any) is untouched")
    with full, atomic_directory(out) as tmp:
        sink = SplitParquetSink(tmp)
        with DataContext.current(_decode_context()):
            decode_images(rows.table, data).write_datasink(sink)  # one streaming pass: decode, split, write
        rejects = pd.concat([rows.rejects, sink.rejects], ignore_index=True)
        _check_reject_fraction(rejects, rows.total, data, out)
        kept = rows.table[~rows.table["id"].isin(sink.rejects["id"])]
        rejects.to_csv(tmp / REJECTS, index=False)
        save_config(cfg, tmp / CONFIG)
        write_json(tmp / MANIFEST, build_manifest(data, kept, rejects, rows.total, sources, fingerprint))
    counts = kept["split"].value_counts().sort_index()
    log.info("prepared %s: %s; %d rejected (see %s)", out,
             ", ".join(f"{s}={n}" for s, n in counts.items()), len(rejects), out / REJECTS)
    return out


def collect_rows(data: DataConfig) -> Rows:
    """Read and validate the labels (and the external test labels), and give every good row its split."""
    main = read_labels(data.labels, data.images)
    sources = [main]
    table = main.table.copy()
    if not main.format.labeled:
        table["split"] = UNLABELED  # e.g. the Kaggle test CSV: prepared for inference only
    else:
        test_fraction = 0.0 if data.test_labels else data.test_fraction
        table["split"] = assign_splits(table, data.val_fraction, test_fraction, data.age_band_months)
    if data.test_labels:
        test = read_labels(data.test_labels, data.test_images or data.images)
        if not test.format.labeled:
            raise LabelsError(f"data.test_labels={data.test_labels} has no bone ages ({test.format.name}); "
                              "a test split needs labels")
        sources.append(test)
        table = pd.concat([table, test.table.assign(split=TEST)], ignore_index=True)
    table, leaked = _reject_ids_in_several_files(table)
    rejects = pd.concat([s.rejects for s in sources] + [leaked, unlabeled_image_rejects(sources)],
                        ignore_index=True)
    return Rows(table=table, rejects=rejects, sources=sources)


def decode_images(table: pd.DataFrame, data: DataConfig) -> ray.data.Dataset:
    """A Ray Dataset of the rows with an ``image`` column (raw pixels, see :mod:`boneage.dataset`) and a
    ``reject_reason`` ('' when decoded)."""
    # At least MIN_DECODE_TASKS tasks so every CPU works; at most decode_batch_size images per task.
    rows_per_task = max(1, min(data.decode_batch_size, math.ceil(len(table) / MIN_DECODE_TASKS)))
    chunks = [table.iloc[i:i + rows_per_task] for i in range(0, len(table), rows_per_task)]
    blocks = ray.data.from_pandas(chunks or [table])  # one block per chunk: one decode task each
    return blocks.map_batches(
        decode_batch, batch_size=None, batch_format="numpy",
        fn_kwargs={"size": data.image_size, "max_megapixels": data.max_image_megapixels})


def _decode_context() -> DataContext:
    """Ray Data settings for the decode pass. Its input is a table already in memory, so Ray Data's default of
    reserving part of the CPUs for each operator only idles them: on 2 cores it ran decoding on one (1.5x slower)."""
    context = quiet_context()
    context.op_resource_reservation_enabled = False
    return context


def decode_batch(batch: dict[str, np.ndarray], size: int, max_megapixels: float) -> pa.Table:
    """Decode one batch of paths into an ``image`` column (see :mod:`boneage.dataset`) and a ``reject_reason``
    ('' when decoded); a file that fails keeps a black image and its reason."""
    images = np.zeros((len(batch["path"]), size, size), dtype=np.uint8)
    reasons = []
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = load_radiograph(path, size, max_megapixels)
            reasons.append("")
        except ImageRejected as err:
            reasons.append(err.reason)
        except OSError as err:  # unreadable file (permissions, vanished)
            reasons.append(f"{REJECT_UNDECODABLE}: cannot read file: {err}")
    columns = {name: pa.array(values) for name, values in batch.items()}
    return pa.table({**columns, "image": image_column(images), "reject_reason": pa.array(reasons, pa.string())})


class SplitParquetSink(Datasink[pd.DataFrame]):
    """Writes decoded rows to ``<folder>/split=<split>/*.parquet`` and collects the rows that failed to decode.

    Ray Data fuses decoding and writing into one task per decode batch. Each task writes one file per split it
    holds (named after the task, so a retried task overwrites its own files) and returns its rejected rows, which
    are few; after the write, :attr:`rejects` holds them all. (No ``min_rows_per_write``: bundling blocks for
    bigger files would also bundle the fused decode work into fewer, serial tasks.)
    """

    def __init__(self, folder: Path):
        self.folder = str(folder)
        self.rejects = pd.DataFrame(columns=REJECT_COLUMNS)

    def write(self, blocks: Iterable[Block], ctx) -> pd.DataFrame:
        table = pa.concat_tables([BlockAccessor.for_block(b).to_arrow() for b in blocks])
        failed = pc.not_equal(table["reject_reason"], "")
        good = table.filter(pc.invert(failed))
        for split in pc.unique(good[SPLIT_COLUMN]).to_pylist():
            folder = split_path(self.folder, split)
            folder.mkdir(exist_ok=True)
            rows = good.filter(pc.equal(good[SPLIT_COLUMN], split)).select(PART_COLUMNS)
            pq.write_table(rows, folder / f"part-{ctx.task_idx:05d}.parquet")
        rejected = table.filter(failed).select(["id", "path", "reject_reason"]).to_pandas()
        return rejected.rename(columns={"reject_reason": "reason"})

    def on_write_complete(self, write_result: WriteResult[pd.DataFrame]) -> None:
        self.rejects = pd.concat([self.rejects, *write_result.write_returns], ignore_index=True)


def input_fingerprint(data: DataConfig, sources: list[dict[str, Any]]) -> str:
    """A hash of everything that determines the output: label files, image files, settings, preprocessing."""
    settings = values_with(Role.FINGERPRINT, data)
    return sha256_json({"prepare_version": PREPARE_VERSION, "settings": settings, "sources": sources})


def build_manifest(data: DataConfig, kept: pd.DataFrame, rejects: pd.DataFrame, total: int,
                   sources: list[dict[str, Any]], fingerprint: str) -> dict[str, Any]:
    """What the prepared folder holds and how it was made (``_manifest.json``)."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "image_size": data.image_size,
        "columns": {"id": "string",
                    "image": f"{data.image_size}x{data.image_size} uint8 pixels, row-major, as fixed-size binary",
                    "boneage": "float64 months (NaN when unlabeled)", "male": "bool",
                    "split": "string, from the split=<name> folder"},
        "preprocessing": {**PREPROCESSING, "max_image_megapixels": data.max_image_megapixels,
                          "prepare_version": PREPARE_VERSION},
        "splits": {"counts": kept["split"].value_counts().sort_index().to_dict(), "val_fraction": data.val_fraction,
                   "test_fraction": 0.0 if data.test_labels else data.test_fraction,
                   "test_from": data.test_labels, "stratified_by": f"sex x {data.age_band_months}-month age band"},
        "label_statistics": {split: label_statistics(group) for split, group in kept.groupby("split")},
        "rejects": {"count": len(rejects), "fraction": len(rejects) / max(total, 1),
                    "by_reason": reject_counts(rejects)},
        "sources": sources,
        "code_version": code_version(),
    }


def label_statistics(table: pd.DataFrame) -> dict[str, float]:
    """Count, bone-age mean/SD/min/max (months) and the male fraction of a table."""
    ages = table["boneage"].dropna()
    stats = {"count": len(table), "male_fraction": float(table["male"].mean()) if len(table) else math.nan}
    if len(ages):
        stats.update(boneage_mean=float(ages.mean()), boneage_std=float(ages.std(ddof=0)),
                     boneage_min=float(ages.min()), boneage_max=float(ages.max()))
    return stats


def _is_current(out: Path, fingerprint: str) -> bool:
    try:
        return read_manifest(out).get("fingerprint") == fingerprint
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _reject_ids_in_several_files(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An id in both the labels and the test labels would leak test images into training: reject it."""
    shared = table["id"].duplicated(keep=False)
    leaked = table[shared]
    rejects = pd.DataFrame({"id": leaked["id"], "path": leaked["path"],
                            "reason": [f"{REJECT_DUPLICATE_ID}: id {i} is in both data.labels and data.test_labels"
                                       for i in leaked["id"]]}, columns=REJECT_COLUMNS)
    return table[~shared].reset_index(drop=True), rejects


def _check_reject_fraction(rejects: pd.DataFrame, total: int, data: DataConfig, out: Path) -> None:
    fraction = len(rejects) / max(total, 1)
    if fraction <= data.max_reject_fraction and len(rejects) < total:
        return
    report = out.with_name(f"{out.name}.rejects.csv")
    report.parent.mkdir(parents=True, exist_ok=True)
    rejects.to_csv(report, index=False)
    reasons = reject_counts(rejects)
    raise TooManyRejects(f"rejected {len(rejects)} of {total} rows ({fraction:.1%}), over the limit of "
                         f"{data.max_reject_fraction:.1%} (data.max_reject_fraction); by reason: {reasons}; "
                         f"every rejected row with its reason: {report}")


def _describe_source(source: LabelTable) -> dict[str, Any]:
    """A labels file and its image folder: a content hash of the labels, a (path, size, mtime) digest of images."""
    listing = file_listing(p for paths in source.images.values() for p in paths)
    return {"labels": str(source.source), "format": source.format.name,
            "labels_sha256": sha256_file(source.source), "image_files": len(listing),
            "image_listing_sha256": sha256_json(listing)}

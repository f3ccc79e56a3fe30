"""The Ray Data prepare job, end to end on real files: phantoms, bad inputs, atomic output, a folder that standard
Parquet readers read, the old layout rebuilt, the real RSNA samples."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray
import torch

import boneage.prepare as prepare_module
from boneage.config import load_config
from boneage.dataset import (CONFIG, MANIFEST, OLD_LAYOUT_MANIFEST, REJECTS, images_from_column, load_split,
                             read_manifest, read_split, split_names, split_path)
from boneage.prepare import TooManyRejects, prepare_dataset
from helpers import ROOT, data_config
from images import write_truncated_png

pytestmark = pytest.mark.usefixtures("ray_session")


def read_split_frame(out: Path, split: str) -> pd.DataFrame:
    return read_split(out, split).to_pandas()


def copy_phantoms(phantom_dir: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(phantom_dir, dest)
    return dest / "boneage-training-dataset.csv", dest


def test_prepare_phantoms(phantom_dir, tmp_path):
    out = tmp_path / "prepared"
    cfg = data_config(phantom_dir / "boneage-training-dataset.csv", phantom_dir, out)
    assert prepare_dataset(cfg) == out

    manifest = read_manifest(out)
    labels = pd.read_csv(phantom_dir / "boneage-training-dataset.csv", dtype={"id": str}).set_index("id")
    counts = manifest["splits"]["counts"]
    assert set(counts) == {"train", "val", "test"} and sum(counts.values()) == len(labels) == 60
    assert manifest["rejects"]["count"] == 0 and manifest["image_size"] == 32
    assert manifest["sources"][0]["format"] == "kaggle-train" and len(manifest["sources"][0]["labels_sha256"]) == 64
    assert manifest["code_version"]["package"]
    assert load_config(out / CONFIG) == cfg  # the resolved config, reloadable as is

    seen = set()
    for split, n in counts.items():
        rows = read_split_frame(out, split)
        assert list(rows.columns) == ["id", "image", "boneage", "male", "split"]
        assert len(rows) == n and (rows["split"] == split).all()
        images = images_from_column(rows["image"].to_numpy(), 32)
        assert images.shape == (n, 32, 32) and images.dtype == np.uint8 and images.max() > 100
        assert (rows["boneage"].to_numpy() == labels.loc[rows["id"], "boneage"].to_numpy()).all()
        seen |= set(rows["id"])
    assert seen == set(labels.index)  # every row in exactly one split
    assert pd.read_csv(out / REJECTS).empty


def test_load_split_reads_the_same_rows_as_ray_data_without_ray(prepared_dir):
    rows = read_split_frame(prepared_dir, "val")
    tensors = load_split(prepared_dir, "val")
    assert tensors["image"].shape == (len(rows), 1, 32, 32) and tensors["image"].dtype == torch.uint8
    assert np.array_equal(tensors["image"][:, 0].numpy(), images_from_column(rows["image"].to_numpy(), 32))
    assert np.array_equal(tensors["boneage"].numpy(), rows["boneage"].to_numpy().astype(np.float32))
    assert np.array_equal(tensors["male"].numpy(), rows["male"].to_numpy().astype(np.float32))
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_split(split_path(prepared_dir, "train"), "val")


def test_standard_parquet_readers_read_every_row_of_the_folder_with_its_split(prepared_dir):
    expected = pd.concat([read_split_frame(prepared_dir, s) for s in split_names(prepared_dir)])
    expected_rows = sorted(zip(expected["id"], expected["split"]))
    arrow = ds.dataset(prepared_dir, partitioning="hive").to_table()
    ray_data = ray.data.read_parquet(str(prepared_dir))
    frames = {"pyarrow.dataset": arrow.to_pandas(), "pq.read_table": pq.read_table(prepared_dir).to_pandas(),
              "pandas": pd.read_parquet(prepared_dir), "ray.data": ray_data.to_pandas()}
    for reader, rows in frames.items():
        assert sorted(rows.columns) == ["boneage", "id", "image", "male", "split"], reader
        assert sorted(zip(rows["id"], rows["split"].astype(str))) == expected_rows, reader
    assert arrow.schema.field("split").type == pa.string() and pa.types.is_fixed_size_binary(arrow["image"].type)
    assert ray_data.schema().base_schema.field("split").type == pa.string()
    assert expected["split"].map(type).eq(str).all()  # read_split gives strings too
    # pq.read_table (and so pandas) types a hive partition as a dictionary: a categorical of the split names
    assert isinstance(frames["pandas"]["split"].dtype, pd.CategoricalDtype)


def old_layout(folder: Path) -> None:
    """Turn a prepared folder into the layout before prepare version 3: train/ val/ test/, manifest.json."""
    for split in split_names(folder):
        split_path(folder, split).rename(folder / split)
    (folder / MANIFEST).rename(folder / OLD_LAYOUT_MANIFEST)


def test_the_old_layout_is_refused_by_training_and_rebuilt_by_prepare(prepared_dir, phantom_dir, tmp_path):
    old = tmp_path / "prepared"
    shutil.copytree(prepared_dir, old)
    old_layout(old)
    train = subprocess.run([sys.executable, "jobs/train.py", "--set", f"data.out={old}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 1 and "Traceback" not in train.stderr
    assert train.stderr.strip().splitlines()[-1] == (
        f"error: {old} was prepared by an older version (train/ val/ folders, no {MANIFEST}); rerun "
        "jobs/prepare.py with the same settings to rebuild it")
    assert prepare_dataset(data_config(phantom_dir / "boneage-training-dataset.csv", phantom_dir, old)) == old
    assert sorted(p.name for p in old.iterdir()) == sorted([CONFIG, MANIFEST, REJECTS, "split=test", "split=train",
                                                            "split=val"])


def test_rerun_on_unchanged_inputs_reuses_the_output(phantom_dir, tmp_path):
    out = tmp_path / "prepared"
    cfg = data_config(phantom_dir / "boneage-training-dataset.csv", phantom_dir, out)
    prepare_dataset(cfg)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    prepare_dataset(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    resized = data_config(phantom_dir / "boneage-training-dataset.csv", phantom_dir, out, "data.image_size=64")
    prepare_dataset(resized)  # a changed setting rebuilds
    assert read_manifest(out)["image_size"] == 64


def test_undecodable_images_are_reported_not_dropped(phantom_dir, tmp_path):
    labels, images = copy_phantoms(phantom_dir, tmp_path / "src")
    bad_id = pd.read_csv(labels, dtype={"id": str})["id"].iloc[3]
    write_truncated_png(next(images.rglob(f"{bad_id}.png")))
    out = tmp_path / "prepared"
    prepare_dataset(data_config(labels, images, out, "data.max_reject_fraction=0.05"))
    rejects = pd.read_csv(out / REJECTS, dtype={"id": str})
    assert rejects["id"].tolist() == [bad_id]
    assert rejects["reason"].iloc[0].startswith("truncated_image")
    assert sum(read_manifest(out)["splits"]["counts"].values()) == 59
    assert read_manifest(out)["rejects"]["by_reason"] == {"truncated_image": 1}


def test_too_many_rejects_fails_and_keeps_the_previous_dataset(phantom_dir, tmp_path):
    labels, images = copy_phantoms(phantom_dir, tmp_path / "src")
    out = tmp_path / "prepared"
    prepare_dataset(data_config(labels, images, out))
    good_manifest = read_manifest(out)
    for path in sorted(images.rglob("*.png"))[:2]:
        write_truncated_png(path)  # 2 of 60 rejected: over the 1% default
    with pytest.raises(TooManyRejects, match=r"rejected 2 of 60 rows \(3.3%\).*data.max_reject_fraction"):
        prepare_dataset(data_config(labels, images, out))
    assert read_manifest(out) == good_manifest  # the old complete dataset is untouched
    report = pd.read_csv(tmp_path / "prepared.rejects.csv")
    assert len(report) == 2 and report["reason"].str.startswith("truncated_image").all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "prepared.rejects.csv", "src"]


def test_a_crash_while_writing_leaves_no_half_written_dataset(phantom_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(data_config(phantom_dir / "boneage-training-dataset.csv", phantom_dir, tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


def test_external_test_labels_become_the_test_split(phantom_dir, tmp_path):
    labels, images = copy_phantoms(phantom_dir, tmp_path / "src")
    table = pd.read_csv(labels, dtype={"id": str})
    held_out = table.iloc[:10]
    table.iloc[10:].to_csv(labels, index=False)
    pd.DataFrame({"Case ID": held_out["id"], "Sex": np.where(held_out["male"], "M", "F"),
                  "Ground truth bone age (months)": held_out["boneage"] + 0.5}).to_excel(
        tmp_path / "gt.xlsx", index=False)
    out = tmp_path / "prepared"
    prepare_dataset(data_config(labels, images, out, f"data.test_labels={tmp_path / 'gt.xlsx'}"))
    test = read_split_frame(out, "test")
    assert sorted(test["id"]) == sorted(held_out["id"])
    assert set(test["boneage"]) == set(held_out["boneage"] + 0.5)
    manifest = read_manifest(out)
    assert manifest["rejects"]["count"] == 0  # the held-out images are labeled by the second file
    assert [s["format"] for s in manifest["sources"]] == ["kaggle-train", "rsna-test"]


def test_unlabeled_layout_is_prepared_for_inference(phantom_dir, tmp_path):
    labels, images = copy_phantoms(phantom_dir, tmp_path / "src")
    table = pd.read_csv(labels, dtype={"id": str})
    pd.DataFrame({"Case ID": table["id"], "Sex": np.where(table["male"], "M", "F")}).to_csv(
        tmp_path / "test.csv", index=False)
    out = tmp_path / "prepared"
    prepare_dataset(data_config(tmp_path / "test.csv", images, out))
    assert read_manifest(out)["splits"]["counts"] == {"unlabeled": 60}
    assert np.isnan(read_split_frame(out, "unlabeled")["boneage"].to_numpy(dtype=float)).all()


def test_prepare_job_command_line(phantom_dir, tmp_path):
    out = tmp_path / "prepared"
    result = subprocess.run(
        [sys.executable, "jobs/prepare.py", "--config", "configs/data.yaml", "--set",
         f"data.labels={phantom_dir / 'boneage-training-dataset.csv'}", f"data.images={phantom_dir}",
         f"data.out={out}", "data.image_size=32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"prepared: {out}" in result.stdout
    assert json.loads((out / MANIFEST).read_text())["image_size"] == 32


@pytest.mark.real_data
def test_prepare_real_thumbnails(thumbs, tmp_path):
    out = tmp_path / "thumbs"
    prepare_dataset(data_config(thumbs / "boneage-training-dataset.csv", thumbs, out))
    manifest = read_manifest(out)
    counts = manifest["splits"]["counts"]
    assert sum(counts.values()) == 10_000 and manifest["rejects"]["count"] == 0
    assert counts["train"] == pytest.approx(7000, abs=30) and counts["val"] == pytest.approx(1500, abs=30)
    stats = manifest["label_statistics"]["train"]
    assert stats["boneage_mean"] == pytest.approx(127, abs=3) and stats["male_fraction"] == pytest.approx(0.54, abs=0.02)


@pytest.mark.real_data
def test_prepare_real_fullsize_radiographs(fullsize, tmp_path):
    out = tmp_path / "full"
    prepare_dataset(data_config(fullsize / "train.csv", fullsize, out, "data.image_size=64"))
    rows = pd.concat([read_split_frame(out, s) for s in read_manifest(out)["splits"]["counts"]])
    assert len(rows) == 32
    # 1600x2080 portrait: 49 px wide at 64 px high, padded with black at the sides.
    images = images_from_column(rows["image"].to_numpy(), 64)
    assert (images[:, :, :7] == 0).all() and (images[:, :, -7:] == 0).all()
    # The two palette PNGs' transparent (white-in-palette) background must come out black like the others'.
    is_palette = rows["id"].isin(["1578", "2110"]).to_numpy()
    dark = (images[:, :, 8:-8] < 10).mean(axis=(1, 2))  # share of background inside the picture
    assert is_palette.sum() == 2
    assert dark[is_palette].min() > 0.5 * np.median(dark[~is_palette]) > 0.1

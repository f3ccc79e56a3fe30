"""The Ray Data prepare job, end to end on real files: phantoms, bad inputs, atomic output, the real RSNA samples."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import boneage.prepare as prepare_module
from boneage.config import load_config
from boneage.dataset import images_from_column, load_split, read_manifest, read_split
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
    assert load_config(out / "config.yaml") == cfg  # the resolved config, reloadable as is

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
    assert pd.read_csv(out / "rejects.csv").empty


def test_load_split_reads_the_same_rows_as_ray_data_without_ray(prepared_dir):
    rows = read_split_frame(prepared_dir, "val")
    tensors = load_split(prepared_dir, "val")
    assert tensors["image"].shape == (len(rows), 1, 32, 32) and tensors["image"].dtype == torch.uint8
    assert np.array_equal(tensors["image"][:, 0].numpy(), images_from_column(rows["image"].to_numpy(), 32))
    assert np.array_equal(tensors["boneage"].numpy(), rows["boneage"].to_numpy().astype(np.float32))
    assert np.array_equal(tensors["male"].numpy(), rows["male"].to_numpy().astype(np.float32))
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_split(prepared_dir / "train", "val")


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
    rejects = pd.read_csv(out / "rejects.csv", dtype={"id": str})
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
    assert json.loads((out / "manifest.json").read_text())["image_size"] == 32


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

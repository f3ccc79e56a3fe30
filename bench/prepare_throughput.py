"""Benchmark the prepare job against plain single-process PIL, on the real RSNA samples (issue 2).

    python bench/prepare_throughput.py [--fullsize-repeats 64] [--runs 3] [--data DIR]

1. Prepare throughput (images/s): ``jobs/prepare.py``'s library call (labels, validation, Ray Data decode and
   resize on every CPU, Parquet write, manifest) against a loop calling the same decode+resize function in one
   process. Target: at least 1.7x on 2 cores.
2. One training epoch (the train split) read back from the prepared Parquet through Ray Data, images as uint8
   arrays, against decoding the same PNGs again. Target: at least 20x.

Both run on the 32 full-size radiographs (repeated through symlinks to a realistic count, since 32 images take less
time than Ray's start-up) and on the 10,000 thumbnails: the real RSNA samples that sit beside the project in CI
(../shared/data; a clone lacks them, --data names another copy). The first prepare run is reported apart ("cold":
Ray starts its worker processes); the ratio uses the median of the warm runs. Results: bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
import ray
from ray.data import DataContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, timed, write_result  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.dataset import images_from_column, read_split  # noqa: E402
from boneage.imaging import load_radiograph  # noqa: E402
from boneage.prepare import prepare_dataset  # noqa: E402
from boneage.rsna import read_labels  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def repeated_fullsize(folder: Path, repeats: int, data: Path) -> tuple[Path, Path]:
    """The 32 full-size PNGs, each linked ``repeats`` times under new ids: a realistic number of files."""
    source = data / "rsna-fullsize"
    labels = pd.read_csv(source / "train.csv", dtype=str)
    rows = []
    for k in range(repeats):
        for row in labels.itertuples():
            new_id = f"{row.id}{k:04d}"
            (folder / f"{new_id}.png").symlink_to(source / "boneage-training-dataset" / f"{row.id}.png")
            rows.append((new_id, row.boneage, row.male))
    pd.DataFrame(rows, columns=["id", "boneage", "male"]).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv", folder


def decode_each(table: pd.DataFrame, size: int) -> pd.Series:
    """The baseline: the same decode + resize, one image after another in this process; seconds per image id."""
    seconds = {}
    for image_id, path in zip(table["id"], table["path"]):
        seconds[image_id] = timed(lambda: load_radiograph(path, size))
    return pd.Series(seconds)


def read_train_epoch(prepared: Path, size: int) -> int:
    """Read the train split through Ray Data as uint8 image arrays, as a training epoch does; return the rows."""
    rows = 0
    for batch in read_split(prepared, "train").iter_batches(batch_size=256, batch_format="numpy"):
        rows += len(images_from_column(batch["image"], size))
    return rows


def measure(name: str, labels: Path, images: Path, size: int, runs: int, work: Path) -> dict:
    table = read_labels(labels, images).table
    n = len(table)
    print(f"{name}: {n} images at {size} px")
    per_image = decode_each(table, size)
    loop_s = float(per_image.sum())
    cfg = load_config(overrides=[f"data.labels={labels}", f"data.images={images}", f"data.out={work / name}",
                                 f"data.image_size={size}"])

    def prepare_fresh():
        shutil.rmtree(work / name, ignore_errors=True)
        prepare_dataset(cfg)

    cold_s = timed(prepare_fresh)
    warm = [timed(prepare_fresh) for _ in range(runs)]
    warm_s = statistics.median(warm)
    epoch_s = median_time(lambda: read_train_epoch(work / name, size), runs)
    train_ids = read_split(work / name, "train").select_columns(["id"]).to_pandas()["id"]
    train_decode_s = float(per_image[train_ids].sum())
    result = {
        "images": n, "image_size": size,
        "single_process_loop": {"seconds": loop_s, "images_per_s": n / loop_s},
        "prepare_cold": {"seconds": cold_s, "images_per_s": n / cold_s},
        "prepare_warm": {"seconds_median": warm_s, "runs": warm, "images_per_s": n / warm_s},
        "prepare_speedup_vs_loop": loop_s / warm_s,
        "train_epoch": {"images": len(train_ids), "parquet_seconds_median": epoch_s,
                        "png_decode_seconds": train_decode_s},
        "parquet_epoch_speedup_vs_png_decode": train_decode_s / epoch_s,
    }
    print(f"  loop {n / loop_s:.0f} img/s | prepare {n / warm_s:.0f} img/s warm ({n / cold_s:.0f} cold): "
          f"{loop_s / warm_s:.2f}x | train epoch: parquet {epoch_s:.2f} s vs decode {train_decode_s:.2f} s: "
          f"{train_decode_s / epoch_s:.1f}x")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fullsize-repeats", type=int, default=64)
    parser.add_argument("--fullsize-size", type=int, default=256)
    parser.add_argument("--thumbs-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA, help=f"the RSNA samples (default: {DATA})")
    args = parser.parse_args()
    if not (args.data / "rsna-fullsize").is_dir() or not (args.data / "rsna-thumbs").is_dir():
        sys.exit(f"the real RSNA samples are not at {args.data}: pass --data DIR, a folder holding rsna-fullsize/ "
                 f"(train.csv, boneage-training-dataset/<id>.png) and rsna-thumbs/")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        links = work / "fullsize-links"
        links.mkdir()
        labels, images = repeated_fullsize(links, args.fullsize_repeats, args.data)
        fullsize = measure("fullsize", labels, images, args.fullsize_size, args.runs, work)
        thumbs_dir = args.data / "rsna-thumbs"
        thumbs = measure("thumbs", thumbs_dir / "boneage-training-dataset.csv", thumbs_dir, args.thumbs_size,
                         args.runs, work)
    ray.shutdown()
    write_result("prepare", {
        "targets": {"prepare_speedup_vs_loop": 1.7, "parquet_epoch_speedup_vs_png_decode": 20},
        "fullsize": fullsize, "thumbs": thumbs,
        "notes": "fullsize: the 32 real 1600x2080 PNGs, each linked --fullsize-repeats times",
    })


if __name__ == "__main__":
    main()

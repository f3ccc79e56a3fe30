"""Benchmark reading a prepared split with ``boneage.dataset.read_split`` against Ray Data's default Parquet reader.

    python bench/read_split.py [--runs 5] [--data DIR]

Ray Data 2.60 reads Parquet through its V2 datasource by default, whose file listing starts a pool of 32
footer-reader actors (32 processes) for every read; ``read_split`` asks for the V1 reader instead. Both read the
same split folder into the object store (``materialize``, as a training run does), in the same Ray session, taking
turns, on two datasets: the tiny phantom split the tests train on (45 rows, 8 files) and the 10,000 real RSNA
thumbnails prepared at 64 px (../shared/data; a clone lacks them, --data names another copy). Both readers must give
the same rows in the same order. Results: bench/results/read_split.json (seconds per read, medians, and the ratio).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import ray
from ray.data import DataContext
from ray.data.datasource import Partitioning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed, write_result  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.dataset import quiet_context, read_split, split_path  # noqa: E402
from boneage.phantoms.generate import generate_phantoms  # noqa: E402
from boneage.prepare import prepare_dataset  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def read_with_ray_default(root: Path, split: str) -> ray.data.Dataset:
    """The baseline: the same read as ``read_split`` with Ray Data's default (V2) Parquet reader."""
    path = split_path(root, split)
    context = quiet_context()
    context.execution_options.preserve_order = True
    context.use_datasource_v2 = True
    with DataContext.current(context):
        return ray.data.read_parquet(str(path), partitioning=Partitioning("hive", base_dir=str(path.parent)))


def compare(name: str, root: Path, runs: int) -> dict:
    """Seconds to materialize the train split with each reader, taking turns ``runs`` times."""
    ids = {reader: read(root, "train").select_columns(["id"]).to_pandas()["id"].tolist()
           for reader, read in (("read_split", read_split), ("ray_default", read_with_ray_default))}
    if ids["read_split"] != ids["ray_default"]:
        raise SystemExit(f"{name}: the two readers gave different rows or another order")
    seconds = {"read_split": [], "ray_default": []}
    for _ in range(runs):
        seconds["ray_default"].append(timed(lambda: read_with_ray_default(root, "train").materialize()))
        seconds["read_split"].append(timed(lambda: read_split(root, "train").materialize()))
    medians = {reader: statistics.median(values) for reader, values in seconds.items()}
    files = len(list(split_path(root, "train").glob("*.parquet")))
    print(f"{name}: {len(ids['read_split'])} rows in {files} files: read_split {medians['read_split']:.2f} s, "
          f"Ray's default reader {medians['ray_default']:.2f} s: {medians['ray_default'] / medians['read_split']:.1f}x")
    return {"rows": len(ids["read_split"]), "files": files, "seconds": seconds, "median_seconds": medians,
            "speedup": medians["ray_default"] / medians["read_split"]}


def prepare(labels: Path, images: Path, out: Path, size: int) -> Path:
    return prepare_dataset(load_config(overrides=[f"data.labels={labels}", f"data.images={images}",
                                                  f"data.out={out}", f"data.image_size={size}"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DATA, help=f"the RSNA samples (default: {DATA})")
    args = parser.parse_args()
    thumbs = args.data / "rsna-thumbs"
    if not thumbs.is_dir():
        sys.exit(f"the real RSNA samples are not at {args.data}: pass --data DIR, a folder holding rsna-thumbs/")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantoms = generate_phantoms(load_config(overrides=[f"phantoms.out={work / 'phantoms'}", "phantoms.n=60",
                                                            "phantoms.size=64", "phantoms.workers=1"]))
        results = {
            "phantoms": compare("phantoms", prepare(phantoms / "boneage-training-dataset.csv", phantoms,
                                                    work / "phantoms-32", 32), args.runs),
            "rsna_thumbs": compare("rsna thumbs", prepare(thumbs / "boneage-training-dataset.csv", thumbs,
                                                          work / "thumbs-64", 64), args.runs),
        }
    ray.shutdown()
    write_result("read_split", {**results, "notes": "materialize() of the train split; Ray's default reader is "
                                "read_parquet with DataContext.use_datasource_v2 = True (Ray Data 2.60)"})


if __name__ == "__main__":
    main()

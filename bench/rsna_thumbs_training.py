"""A real-data training run: VGG16 on the 10,000 real RSNA thumbnails, against the predict-the-mean baseline.

    python bench/rsna_thumbs_training.py [--epochs 4] [--image-size 64] [--data DIR]

Prepares the thumbnails (100x100 squashed originals; beside the project in CI, ../shared/data/rsna-thumbs, not in a
clone: --data names any RSNA training folder instead) at --image-size, trains with the demo's CPU settings
(configs/demo.yaml) through the same `jobs/train.py` library call, and records the best val MAE, the baseline and
the time in bench/results/rsna_thumbs_training.json. On 2 CPU cores this is slow: about 2 minutes per epoch at 64 px
in bf16 (AMX), 4 in fp32. A GPU run of the same data: bench/gpu_train.py --train-on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.dataset import read_manifest  # noqa: E402
from boneage.prepare import prepare_dataset  # noqa: E402
from boneage.train import run_training  # noqa: E402

THUMBS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-thumbs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/rsna-thumbs"))
    parser.add_argument("--data", type=Path, default=THUMBS, help=f"RSNA training folder (default: {THUMBS})")
    args = parser.parse_args()
    labels = args.data / "boneage-training-dataset.csv"
    if not labels.is_file():
        sys.exit(f"no RSNA training labels at {labels}: pass --data DIR, a folder holding "
                 f"boneage-training-dataset.csv and its images (the Kaggle download's layout)")
    ray.init(num_cpus=4, include_dashboard=False)  # logical CPUs beyond the cores leave Ray Data room to read
    cfg = load_config("configs/demo.yaml", [
        f"data.labels={labels}", f"data.images={args.data}",
        f"data.out={args.out / f'prepared-{args.image_size}'}", f"data.image_size={args.image_size}",
        f"train.epochs={args.epochs}", f"train.storage_path={args.out / 'ray_results'}",
        f"registry.root={args.out / 'registry'}", "registry.name=boneage-vgg16-rsna-thumbs"])
    prepare_dataset(cfg)
    started = time.perf_counter()
    outcome = run_training(cfg)
    seconds = time.perf_counter() - started
    counts = read_manifest(cfg.data.out)["splits"]["counts"]
    print(f"val MAE {outcome.metrics['val_mae']:.2f} months vs predict-the-mean {outcome.baseline_mae:.2f} "
          f"({outcome.metrics['val_mae'] / outcome.baseline_mae:.2f} of it) after {args.epochs} epochs, "
          f"{seconds / 60:.1f} min")
    write_result("rsna_thumbs_training", {
        "data": "rsna-thumbs: 10,000 real RSNA training images squashed to 100x100" if args.data == THUMBS
        else str(args.data), "splits": counts,
        "image_size": args.image_size, "epochs": args.epochs, "model": "vgg16_bn, random init, avg pool, head [256]",
        "best_epoch_metrics": outcome.metrics, "val_mae_mean_baseline": outcome.baseline_mae,
        "ratio_to_baseline": outcome.metrics["val_mae"] / outcome.baseline_mae, "train_seconds": seconds,
        "bundle": str(outcome.bundle),
    })


if __name__ == "__main__":
    main()

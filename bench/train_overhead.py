"""Benchmark Ray Train's overhead: one Ray Train worker against a plain PyTorch loop (issue 3).

    python bench/train_overhead.py [--n 1600] [--image-size 64] [--threads 2]

Both run the same `boneage.engine.TrainStep` (model, augmentation, optimiser) with the same batch size and torch
threads on the same phantom images. The plain loop iterates in-memory tensors; the Ray Train worker streams the
prepared Parquet through Ray Data (`iter_torch_batches`, prefetching). Each side trains two epochs and the second
(warm) epoch's images/s is compared. Target: Ray within 10%. Results: bench/results/train_overhead.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import resident_batches, write_result  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.dataset import load_split, read_manifest  # noqa: E402
from boneage.engine import TrainStep  # noqa: E402
from boneage.model import build_model  # noqa: E402
from boneage.phantoms.generate import generate_phantoms  # noqa: E402
from boneage.prepare import prepare_dataset  # noqa: E402
from boneage.train import run_training  # noqa: E402


def plain_loop_images_per_s(cfg, prepared: Path, threads: int) -> float:
    """Train two epochs in this process on in-memory batches; images/s of the second."""
    torch.set_num_threads(threads)
    manifest = read_manifest(prepared)
    size, stats = manifest["image_size"], manifest["label_statistics"]["train"]
    train = load_split(prepared, "train")
    batch_size = cfg.train.batch_size
    steps = len(train["image"]) // batch_size
    model = build_model(cfg.model, size).to(memory_format=torch.channels_last)
    step = TrainStep(model, model, cfg, steps, stats["boneage_mean"], stats["boneage_std"], torch.device("cpu"))
    rate = 0.0
    for epoch in range(2):
        step.start_epoch(epoch)
        started = time.perf_counter()
        for batch in resident_batches(train, batch_size):
            step(batch)
        step.loss_sum.item()  # wait for the last step
        rate = steps * batch_size / (time.perf_counter() - started)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1600, help="phantoms (70%% are trained on)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    # Logical CPUs beyond the cores: the worker holds one, Ray Data reads with the others.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = [f"phantoms.out={work / 'phantoms'}", f"phantoms.n={args.n}", "phantoms.size=128",
                  f"data.labels={work / 'phantoms' / 'boneage-training-dataset.csv'}",
                  f"data.images={work / 'phantoms'}", f"data.out={work / 'prepared'}",
                  f"data.image_size={args.image_size}", "model.head=[256]", "train.epochs=2",
                  "train.batch_size=32", "train.num_workers=1", "train.cpus_per_worker=1",
                  f"train.threads_per_worker={args.threads}", f"train.storage_path={work / 'runs'}",
                  f"registry.root={work / 'registry'}"]
        cfg = load_config("configs/demo.yaml", common)
        generate_phantoms(cfg)
        prepare_dataset(cfg)
        plain = plain_loop_images_per_s(cfg, work / "prepared", args.threads)
        outcome = run_training(cfg)
        ray_rate = outcome.final_metrics["images_per_s_per_worker"]
        train_images = read_manifest(work / "prepared")["splits"]["counts"]["train"]
    ray.shutdown()
    ratio = ray_rate / plain
    print(f"plain loop {plain:.1f} img/s | Ray Train worker {ray_rate:.1f} img/s | ratio {ratio:.3f} "
          f"(overhead {100 * (1 - ratio):.1f}%)")
    write_result("train_overhead", {
        "image_size": args.image_size, "batch_size": 32, "threads": args.threads, "train_images": train_images,
        "plain_loop_images_per_s": plain, "ray_train_images_per_s": ray_rate, "ray_over_plain": ratio,
        "target_ray_over_plain": 0.9,
    })


if __name__ == "__main__":
    main()

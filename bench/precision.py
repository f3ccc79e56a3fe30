"""Benchmark bf16 against fp32 on this machine's CPU: training steps and batched inference (no Ray).

    python bench/precision.py [--image-size 64] [--bundle outputs/registry/boneage-vgg16/1]

Training: `boneage.engine.TrainStep` (augmentation, channels_last, AdamW) at batch 32 with `train.precision` fp32
and bf16, images/s. Inference: `boneage.inference.BoneAgePredictor.predict` at batch 1, 8 and 32, ms per image.
With --bundle (a trained bundle) it also reports how far bf16 answers are from fp32 ones, in months, and whether a
bf16 answer depends on the batch it is computed in. `precision: auto` picks bf16 where this is a clear win (GPUs,
AMX CPUs). Results: bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_like_bundle, median_time, write_result  # noqa: E402

from boneage.bundle import load_bundle  # noqa: E402
from boneage.config import load_config  # noqa: E402
from boneage.engine import TrainStep  # noqa: E402
from boneage.inference import BoneAgePredictor  # noqa: E402
from boneage.model import build_model  # noqa: E402
from boneage.phantoms.generate import generate_phantoms  # noqa: E402
from boneage.precision import has_amx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
BATCHES = (1, 8, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--bundle", help="a trained bundle folder, to measure how bf16 changes the answers")
    args = parser.parse_args()
    torch.manual_seed(0)
    training = {p: train_images_per_s(p, args.image_size) for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else demo_like_bundle(Path(tmp) / "bundle", args.image_size)
        predictors = {p: BoneAgePredictor(load_bundle(bundle), precision=p) for p in PRECISIONS}
        inference = {p: {f"batch_{b}": predict_ms_per_image(predictors[p], b) for b in BATCHES} for p in PRECISIONS}
        answers = answer_differences(predictors, Path(tmp)) if args.bundle else None
    result = {"image_size": args.image_size, "amx": has_amx(), "threads": torch.get_num_threads(),
              "train_images_per_s": training, "train_bf16_speedup": training["bf16"] / training["fp32"],
              "predict_ms_per_image": inference,
              "predict_bf16_batch32_vs_fp32_batch1": inference["fp32"]["batch_1"] / inference["bf16"]["batch_32"],
              "bf16_answers_vs_fp32_months": answers, "bundle": str(args.bundle) if args.bundle else None}
    print(f"training: fp32 {training['fp32']:.0f} img/s, bf16 {training['bf16']:.0f} img/s "
          f"({result['train_bf16_speedup']:.2f}x)")
    for p in PRECISIONS:
        print(f"predict {p}: " + ", ".join(f"batch {b} {inference[p][f'batch_{b}']:.2f} ms/img" for b in BATCHES))
    if answers:
        print(f"bf16 vs fp32 answers: mean {answers['mean_abs']:.3f}, max {answers['max_abs']:.3f} months; "
              f"batch dependence {answers['batch_dependence_max']:.3f} months")
    write_result("precision", result)


def train_images_per_s(precision: str, image_size: int, batch: int = 32, steps: int = 6) -> float:
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"train.precision={precision}", f"train.batch_size={batch}"])
    net = build_model(cfg.model, image_size).to(memory_format=torch.channels_last)
    step = TrainStep(net, net, cfg, steps_per_epoch=100, target_mean=120.0, target_std=40.0,
                     device=torch.device("cpu"))
    step.start_epoch(0)
    data = {"image": torch.randint(0, 256, (batch, 1, image_size, image_size), dtype=torch.uint8),
            "boneage": torch.rand(batch) * 228, "male": (torch.rand(batch) > 0.5).float()}
    step(data)  # warm-up: oneDNN picks its kernels
    return batch / median_time(lambda: step(data), steps)


def predict_ms_per_image(predictor: BoneAgePredictor, batch: int) -> float:
    size = predictor.image_size
    canvases = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
    male = np.arange(batch) % 2 == 0
    predictor.predict(canvases, male)  # warm-up
    return 1000 * median_time(lambda: predictor.predict(canvases, male), max(5, 64 // batch)) / batch


def answer_differences(predictors: dict[str, BoneAgePredictor], work: Path, count: int = 64) -> dict[str, Any]:
    """bf16 against fp32 answers on ``count`` phantoms (months), and bf16 in one batch against one by one."""
    cfg = load_config(overrides=[f"phantoms.out={work / 'phantoms'}", f"phantoms.n={count}", "phantoms.size=256"])
    generate_phantoms(cfg)
    radiographs = [predictors["fp32"].decode(path.read_bytes()) for path in sorted((work / "phantoms").rglob("*.png"))]
    canvases = np.stack([r.canvas for r in radiographs])
    male = np.arange(len(canvases)) % 2 == 0
    fp32 = predictors["fp32"].predict(canvases, male)
    bf16 = predictors["bf16"].predict(canvases, male)
    singles = np.array([predictors["bf16"].predict(c[None], m[None])[0] for c, m in zip(canvases, male)])
    return {"mean_abs": float(np.abs(bf16 - fp32).mean()), "max_abs": float(np.abs(bf16 - fp32).max()),
            "batch_dependence_max": float(np.abs(bf16 - singles).max()), "images": len(canvases)}


if __name__ == "__main__":
    main()

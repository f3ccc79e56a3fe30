"""Benchmark bf16 autocast against fp32 on this machine's CPU: training steps and batched inference (no Ray).

    python bench/precision.py [--image-size 64] [--threads 1 2] [--bundle outputs/registry/boneage-vgg16/1]

Training: `boneage.engine.TrainStep` (augmentation, channels_last, AdamW) at batch 32 with `train.precision` fp32
and bf16, images/s, at each thread count. Inference: `boneage.inference.BoneAgePredictor.predict` at batch 1, 8
and 32, ms per image. fp32 and bf16 are timed in alternation, round after round, so that load from other processes
falls on both alike: the ratios are what to read. With --bundle (a trained bundle) it also reports how far bf16
answers are from fp32 ones, in months, and whether a bf16 answer depends on the batch it is computed in.

Results: bench/results/precision.json, one entry per CPU model (with its bf16 and AMX flags), which is what
`boneage.precision` (``precision: auto``) is decided from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_like_bundle, machine_info, timed  # noqa: E402

from boneage.bundle import load_bundle  # noqa: E402
from boneage.config import load_config  # noqa: E402
from boneage.engine import TrainStep  # noqa: E402
from boneage.inference import BoneAgePredictor  # noqa: E402
from boneage.model import build_model  # noqa: E402
from boneage.phantoms.generate import generate_phantoms  # noqa: E402
from boneage.precision import cpu_kind, resolve_precision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
BATCHES = (1, 8, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads to train with")
    parser.add_argument("--rounds", type=int, default=5, help="alternating fp32/bf16 rounds per measurement")
    parser.add_argument("--bundle", help="a trained bundle folder, to measure how bf16 changes the answers")
    args = parser.parse_args()
    torch.manual_seed(0)
    training = {f"threads_{t}": train_images_per_s(args.image_size, t, args.rounds) for t in args.threads}
    torch.set_num_threads(max(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else demo_like_bundle(Path(tmp) / "bundle", args.image_size)
        predictors = {p: BoneAgePredictor(load_bundle(bundle), precision=p) for p in PRECISIONS}
        inference = {f"batch_{b}": predict_ms_per_image(predictors, b, args.rounds) for b in BATCHES}
        answers = answer_differences(predictors, Path(tmp)) if args.bundle else None
    # A --bundle predicts at its own size, which may differ from the training steps' --image-size.
    result = {"image_size": args.image_size, "predict_image_size": predictors["fp32"].image_size,
              "cpu_kind": cpu_kind(), "flags": bf16_flags(),
              "predict_threads": max(args.threads),
              "train_images_per_s": training, "predict_ms_per_image": inference,
              "auto_chooses": {job: resolve_precision("auto", torch.device("cpu"), job)
                               for job in ("train", "predict")},
              "bf16_answers_vs_fp32_months": answers, "bundle": str(args.bundle) if args.bundle else None}
    report(result)
    write_per_cpu(result)


def bf16_flags() -> dict[str, bool | None]:
    """The CPU flags that decide ``cpu_kind``, as /proc/cpuinfo lists them (None where it cannot be read)."""
    names = ("avx512_bf16", "amx_tile", "amx_bf16")
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return dict.fromkeys(names)
    flags = set(line.split(":", 1)[1].split())
    return {name: name in flags for name in names}


def alternate(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each run, timed in alternation (``rounds`` times each) after one warm-up call each."""
    for run in runs.values():
        run()  # warm-up: oneDNN picks its kernels
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    return {name: statistics.median(values) for name, values in seconds.items()}


def train_images_per_s(image_size: int, threads: int, rounds: int, batch: int = 32) -> dict[str, float]:
    """Training images/s in fp32 and bf16 with ``threads`` torch threads, and bf16's speed-up."""
    torch.set_num_threads(threads)
    data = {"image": torch.randint(0, 256, (batch, 1, image_size, image_size), dtype=torch.uint8),
            "boneage": torch.rand(batch) * 228, "male": (torch.rand(batch) > 0.5).float()}
    steps = {p: train_step(p, image_size, batch) for p in PRECISIONS}
    seconds = alternate({p: (lambda step=step: step(data)) for p, step in steps.items()}, rounds)
    speed = {p: batch / seconds[p] for p in PRECISIONS}
    return {**speed, "bf16_speedup": speed["bf16"] / speed["fp32"]}


def train_step(precision: str, image_size: int, batch: int) -> TrainStep:
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"train.precision={precision}", f"train.batch_size={batch}"])
    net = build_model(cfg.model, image_size).to(memory_format=torch.channels_last)
    step = TrainStep(net, net, cfg, steps_per_epoch=100, target_mean=120.0, target_std=40.0,
                     device=torch.device("cpu"))
    step.start_epoch(0)
    return step


def predict_ms_per_image(predictors: dict[str, BoneAgePredictor], batch: int, rounds: int) -> dict[str, float]:
    """ms per image in fp32 and bf16 at ``batch``, and bf16's speed-up."""
    size = predictors["fp32"].image_size
    canvases = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
    male = np.arange(batch) % 2 == 0
    repeats = max(1, 16 // batch)  # several small batches per timing, so one timing is not a few ms of noise

    def run(predictor: BoneAgePredictor) -> None:
        for _ in range(repeats):
            predictor.predict(canvases, male)

    seconds = alternate({p: (lambda p=p: run(predictors[p])) for p in PRECISIONS}, rounds)
    ms = {p: 1000 * seconds[p] / (batch * repeats) for p in PRECISIONS}
    return {**ms, "bf16_speedup": ms["fp32"] / ms["bf16"]}


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


def report(result: dict[str, Any]) -> None:
    for threads, speed in result["train_images_per_s"].items():
        print(f"training, {threads.replace('_', ' ')}: fp32 {speed['fp32']:.1f} img/s, bf16 {speed['bf16']:.1f} "
              f"img/s ({speed['bf16_speedup']:.2f}x)")
    for batch, ms in result["predict_ms_per_image"].items():
        print(f"predict, {batch.replace('_', ' ')}: fp32 {ms['fp32']:.2f} ms/img, bf16 {ms['bf16']:.2f} ms/img "
              f"({ms['bf16_speedup']:.2f}x)")
    if result["bf16_answers_vs_fp32_months"]:
        answers = result["bf16_answers_vs_fp32_months"]
        print(f"bf16 vs fp32 answers: mean {answers['mean_abs']:.3f}, max {answers['max_abs']:.3f} months; "
              f"batch dependence {answers['batch_dependence_max']:.3f} months")


def write_per_cpu(result: dict[str, Any]) -> Path:
    """Put this run under its CPU model in bench/results/precision.json, keeping the other CPUs' entries."""
    path = RESULTS / "precision.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    machine = machine_info()
    cpus = record.get("cpus", {})
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cpus[machine["cpu_model"]] = {"when": when, "machine": machine, **result}
    path.write_text(json.dumps({"benchmark": "precision", "cpus": cpus}, indent=2) + "\n")
    print(f"results: {path} ({machine['cpu_model']})")
    return path


if __name__ == "__main__":
    main()

"""Benchmark test-time augmentation (boneage.tta): what each choice of the ``tta`` setting does to the error and
what it costs in latency, against ``none`` on the same images and in the same run.

    python bench/tta.py [--bundle FOLDER] [--data PREPARED] [--split test] [--limit 0] [--threads 1] [--runs 20]

Accuracy: every image of the prepared split answered by ``BoneAgePredictor(tta=choice)`` (the service's code and
precision, raw answers: the calibration is fitted without TTA), MAE and bias overall and per age band, the paired
difference of absolute errors against ``none`` with a bootstrap 95% interval, and how far the answers move.
Latency: median milliseconds per image at batch 1 and batch 32 (``--runs`` calls each after a warm-up, the choices
taking turns), and the ratio against ``none``. Results: bench/results/tta.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed, write_result  # noqa: E402

from boneage.bundle import load_bundle  # noqa: E402
from boneage.config import AnswerConfig  # noqa: E402
from boneage.dataset import load_split  # noqa: E402
from boneage.inference import BoneAgePredictor  # noqa: E402
from boneage.metrics import AGE_BANDS, age_band, error_stats  # noqa: E402
from boneage.tta import VIEWS  # noqa: E402

THUMBS = Path("/work/main/outputs/bench/rsna-thumbs")
BUNDLE = THUMBS / "registry" / "boneage-vgg16-rsna-thumbs" / "1"
BATCHES = (1, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(BUNDLE), help="a bundle folder")
    parser.add_argument("--data", default=str(THUMBS / "prepared-64"), help="a prepared dataset (read-only)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N images (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a replica's or actor's share)")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per choice and batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = load_split(args.data, args.split)
    count = args.limit or len(split["image"])
    canvases = split["image"][:count, 0].numpy()  # (N, S, S) uint8
    male, true = split["male"][:count].numpy().astype(bool), split["boneage"][:count].numpy().astype(np.float64)
    bundle = load_bundle(args.bundle)
    answers = {choice: answer_all(BoneAgePredictor(bundle, AnswerConfig(calibrate=False, tta=choice)), canvases, male)
               for choice in VIEWS}
    latency = latencies({choice: BoneAgePredictor(bundle, AnswerConfig(calibrate=False, tta=choice)) for choice in VIEWS},
                        canvases, male, args.runs)
    write_result("tta", {
        "bundle": args.bundle, "data": args.data, "split": args.split, "images": count, "torch_threads": args.threads,
        "precision": BoneAgePredictor(bundle).computes_in, "views": {c: len(v) for c, v in VIEWS.items()},
        "accuracy": {c: accuracy(answers[c], answers["none"], true) for c in VIEWS},
        "latency": {c: with_ratios(latency[c], latency["none"]) for c in VIEWS},
    })


def answer_all(predictor: BoneAgePredictor, canvases: np.ndarray, male: np.ndarray, batch: int = 32) -> np.ndarray:
    """Raw answers (months) for every canvas, in batches."""
    return np.concatenate([predictor.predict(canvases[i:i + batch], male[i:i + batch])
                           for i in range(0, len(canvases), batch)])


def accuracy(months: np.ndarray, baseline: np.ndarray, true: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """MAE and bias overall and per age band; the paired MAE difference against ``baseline`` (negative: better)
    with a bootstrap 95% interval; how far the answers moved from the baseline's."""
    gain = np.abs(months - true) - np.abs(baseline - true)  # per image
    rng = np.random.default_rng(seed)
    resampled = [gain[rng.integers(0, len(gain), len(gain))].mean() for _ in range(2000)]
    stats = error_stats(months, true)
    bands = age_band(true)
    return {
        "mae": stats.mae, "bias": stats.bias, "rmse": stats.rmse,
        "mae_change": float(gain.mean()), "mae_change_ci95": [float(np.percentile(resampled, q)) for q in (2.5, 97.5)],
        "shift_from_none_mean": float((months - baseline).mean()),
        "shift_from_none_mean_abs": float(np.abs(months - baseline).mean()),
        "by_band": {band.name: {"count": int((bands == band.name).sum()),
                                "mae": error_stats(months[bands == band.name], true[bands == band.name]).mae,
                                "bias": error_stats(months[bands == band.name], true[bands == band.name]).bias}
                    for band in AGE_BANDS},
    }


def latencies(predictors: dict[str, BoneAgePredictor], canvases: np.ndarray, male: np.ndarray,
              runs: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per image of each predictor at each batch size, after a warm-up call. The choices take
    turns call by call, so a neighbour's load on this shared machine weighs on all of them alike."""
    times: dict[str, dict[int, list[float]]] = {choice: {batch: [] for batch in BATCHES} for choice in predictors}
    for batch in BATCHES:
        for predictor in predictors.values():
            predictor.predict(canvases[:batch], male[:batch])  # warm-up: oneDNN picks its kernels for this shape
        for _ in range(runs):
            for choice, predictor in predictors.items():
                times[choice][batch].append(timed(lambda: predictor.predict(canvases[:batch], male[:batch])))
    return {choice: {f"batch_{batch}_ms_per_image": 1000 * statistics.median(seconds) / batch
                     for batch, seconds in by_batch.items()} for choice, by_batch in times.items()}


def with_ratios(figures: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """The figures and each one's ratio to the baseline's."""
    return {**figures, **{key.replace("_ms_per_image", "_ratio"): value / baseline[key]
                          for key, value in figures.items()}}


if __name__ == "__main__":
    main()

"""Write a phantom dataset in the Kaggle RSNA layout, so the real loader reads it like any download.

Output folder::

    boneage-training-dataset.csv                            id,boneage,male  (the noisy label, whole months)
    boneage-training-dataset/boneage-training-dataset/<id>.png
    truth.csv        id,maturity_months,boneage,male        (the exact bone age behind each label)
    boxes.csv        id,structure,x0,y0,x1,y1               (age-bearing structures, pixels)
    phantoms.json    settings, label statistics, the best possible MAE
    config.yaml      the resolved config

Image ``i`` depends only on ``(seed, i)``: the same seed gives the same files whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from boneage.artifacts import atomic_directory, code_version, write_json
from boneage.config import Config, PhantomConfig, save_config
from boneage.phantoms.anatomy import build_hand
from boneage.phantoms.dicom import write_phantom_dicom
from boneage.phantoms.film import ASPECT, expose, sample_pose, structure_box

log = logging.getLogger(__name__)

# The RSNA training labels: mean 127 months, SD about 41, range 1-228, 54% boys.
AGE_MEAN, AGE_SD, AGE_MIN, AGE_MAX = 127.0, 41.0, 1.0, 228.0
MALE_FRACTION = 0.54
FIRST_ID = 200001
LABELS_CSV = "boneage-training-dataset.csv"
IMAGE_DIR = Path("boneage-training-dataset") / "boneage-training-dataset"
MAX_CHUNK = 50  # images per worker task
SUMMARY = "phantoms.json"
# Bump whenever a change to the anatomy, maturity or film code changes the images: old sets are then redrawn.
GENERATOR_VERSION = 1


@dataclass
class Phantom:
    """One synthetic radiograph with its exact maturity, noisy label and structure boxes."""

    id: str
    image: np.ndarray  # (height, width) uint8
    maturity: float  # true bone age, months
    label: int  # what a rater would write: maturity + noise, whole months
    male: bool
    boxes: list[tuple[str, int, int, int, int]]


def sample_subject(rng: np.random.Generator, label_noise_sd: float) -> tuple[float, bool, int]:
    """A child from the RSNA label distribution: (true bone age in months, male, the rater's label)."""
    male = bool(rng.random() < MALE_FRACTION)
    maturity = _truncated_normal(rng, AGE_MEAN, AGE_SD, AGE_MIN, AGE_MAX)
    label = int(np.clip(round(maturity + rng.normal(0.0, label_noise_sd)), 0, 240))
    return maturity, male, label


def make_phantom(index: int, seed: int, size: int, label_noise_sd: float) -> Phantom:
    """Render phantom number ``index`` of the set made with ``seed``."""
    rng = np.random.default_rng([seed, index])
    maturity, male, label = sample_subject(rng, label_noise_sd)
    hand = build_hand(maturity, male, rng)
    pose = sample_pose(rng, size)
    image = expose(hand, pose, size, rng)
    height, width = image.shape
    boxes = []
    for bone in hand.bones:
        if bone.age_parts and (box := structure_box(bone.age_parts, pose, height, width)):
            boxes.append((bone.name, *box))
    return Phantom(str(FIRST_ID + index), image, maturity, label, male, boxes)


def generate_phantoms(cfg: Config) -> Path:
    """Write ``cfg.phantoms.n`` phantoms to ``cfg.phantoms.out`` (atomically); return the folder."""
    p = cfg.phantoms
    out = Path(p.out)
    if _is_current(out, p):
        log.info("up to date: %s (same generator and settings; reusing it)", out)
    else:
        _render_set(cfg, out)
    if p.dicom_examples:
        write_dicom_examples(out, Path(p.dicom_out), p.dicom_examples)
    return out


def _render_set(cfg: Config, out: Path) -> None:
    p = cfg.phantoms
    workers = p.workers or os.cpu_count() or 1
    log.info("rendering %d phantoms at %d px with %d processes", p.n, p.size, workers)
    with atomic_directory(out) as tmp:
        (tmp / IMAGE_DIR).mkdir(parents=True)
        chunk = max(1, min(MAX_CHUNK, math.ceil(p.n / (4 * workers))))  # several tasks per process: balanced
        args = [(start, min(start + chunk, p.n), p, str(tmp / IMAGE_DIR)) for start in range(0, p.n, chunk)]
        if workers == 1:
            results = [_render_chunk(*a) for a in args]
        else:
            # spawn, not fork: the parent may hold Ray's threads.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_render_chunk, *zip(*args)))
        truth = pd.concat([r[0] for r in results], ignore_index=True)
        boxes = pd.concat([r[1] for r in results], ignore_index=True)
        truth[["id", "boneage", "male"]].to_csv(tmp / LABELS_CSV, index=False)
        truth.to_csv(tmp / "truth.csv", index=False)
        boxes.to_csv(tmp / "boxes.csv", index=False)
        save_config(cfg, tmp / "config.yaml")
        write_json(tmp / SUMMARY, _summary(truth, p))
    log.info("wrote %s (best possible MAE %.2f months)", out, _best_mae(truth))


def _render_chunk(start: int, stop: int, p: PhantomConfig, image_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    truth, boxes = [], []
    for index in range(start, stop):
        ph = make_phantom(index, p.seed, p.size, p.label_noise_sd)
        Image.fromarray(ph.image).save(Path(image_dir) / f"{ph.id}.png", compress_level=1)
        # The Kaggle CSV writes sex as True/False.
        truth.append((ph.id, round(ph.maturity, 2), ph.label, "True" if ph.male else "False"))
        boxes += [(ph.id, *box) for box in ph.boxes]
    return (pd.DataFrame(truth, columns=["id", "maturity_months", "boneage", "male"]),
            pd.DataFrame(boxes, columns=["id", "structure", "x0", "y0", "x1", "y1"]))


def write_dicom_examples(phantoms: Path, out: Path, count: int) -> Path:
    """The first ``count`` phantoms of a set again as DICOM files in ``out``, for trying the service with DICOM."""
    labels = pd.read_csv(phantoms / LABELS_CSV, dtype={"id": str}).head(count)
    with atomic_directory(out) as tmp:
        for row in labels.itertuples():
            image = np.asarray(Image.open(phantoms / IMAGE_DIR / f"{row.id}.png"))
            write_phantom_dicom(tmp / f"{row.id}.dcm", image, bool(row.male), int(row.boneage))
    log.info("wrote %d DICOM copies to %s", len(labels), out)
    return out


def _settings(p: PhantomConfig) -> dict:
    """What determines the images (not how many processes drew them)."""
    return {"generator_version": GENERATOR_VERSION, "seed": p.seed, "n": p.n, "size": p.size,
            "label_noise_sd": p.label_noise_sd}


def _is_current(out: Path, p: PhantomConfig) -> bool:
    try:
        return json.loads((out / SUMMARY).read_text()).get("settings") == _settings(p)
    except (OSError, ValueError):
        return False


def _truncated_normal(rng: np.random.Generator, mean: float, sd: float, low: float, high: float) -> float:
    while True:
        value = rng.normal(mean, sd)
        if low <= value <= high:
            return float(value)


def _best_mae(truth: pd.DataFrame) -> float:
    """The MAE of a perfect model: it predicts the true maturity; the labels carry the rater noise."""
    return float((truth["boneage"] - truth["maturity_months"]).abs().mean())


def _summary(truth: pd.DataFrame, p: PhantomConfig) -> dict:
    return {
        "settings": _settings(p), "height": p.size, "width": round(p.size * ASPECT),
        "best_possible_mae_months": _best_mae(truth),
        "label_mean": float(truth["boneage"].mean()), "label_sd": float(truth["boneage"].std()),
        "male_fraction": float((truth["male"] == "True").mean()),
        "code_version": code_version(),
    }

"""Where does the model look? The pointing game on phantoms, whose age-bearing structures are known.

The phantom generator writes ``boxes.csv``: for each image, a box (original pixels) around every age-bearing
structure (epiphyses, metaphyses, carpals). Mapped onto the model canvas with the geometry of
:func:`boneage.imaging.fit_to_square`, they answer for any heat map: does its peak fall inside a box, and what
share of its mass lies inside. The figure to compare with is the share a uniformly random point would get: the
area the boxes cover.

On a canvas of S pixels a pixel covers the square [c, c + 1) x [r, r + 1) of canvas coordinates, and it counts as
inside when that square overlaps a box: a heat map has no finer resolution than its pixels, and the random-point
share is measured on the same pixels, so the two figures stay comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from boneage.imaging import square_fit

if TYPE_CHECKING:
    from boneage.inference import BoneAgePredictor

BOX_COLUMNS = ["x0", "y0", "x1", "y1"]


@dataclass
class LocalisationScore:
    """One explainer's pointing game over a set of images."""

    method: str  # the explainer's name (boneage.inference.EXPLAINERS)
    images: int
    peak_in_box: float  # share of images whose heat-map peak lies inside an age-bearing box
    random_point: float  # share a uniformly random point would get: mean area the boxes cover
    mass_in_boxes: float  # mean share of the heat map's mass inside the boxes
    chosen: bool  # the method serving uses
    seconds_per_image: float = 0.0  # heat-map time, for the comparison (not a pass/fail figure)


def canvas_boxes(boxes_csv: Path, image_paths: dict[str, Path], canvas_size: int) -> dict[str, np.ndarray]:
    """The generator's boxes (original pixels) mapped onto the model canvas: ``(K, 4)`` x0, y0, x1, y1 in canvas
    coordinates per id of ``image_paths`` (K = 0 for an image without boxes). Each image's size is read from its
    file header."""
    table = pd.read_csv(boxes_csv, dtype={"id": str})
    grouped = {key: group[BOX_COLUMNS].to_numpy(np.float64) for key, group in table.groupby("id")}
    mapped = {}
    for image_id, path in image_paths.items():
        with Image.open(path) as image:
            width, height = image.size
        boxes = grouped.get(image_id, np.zeros((0, 4)))
        mapped[image_id] = square_fit(width, height, canvas_size).to_canvas(boxes, width, height)
    return mapped


def box_mask(boxes: np.ndarray, canvas_size: int) -> np.ndarray:
    """(S, S) bool: the pixels whose square overlaps one of ``boxes`` (canvas coordinates)."""
    edges = np.arange(canvas_size)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cols = (edges[None, :] < boxes[:, 2:3]) & (edges[None, :] + 1 > boxes[:, 0:1])  # (K, S)
    rows = (edges[None, :] < boxes[:, 3:4]) & (edges[None, :] + 1 > boxes[:, 1:2])  # (K, S)
    return (rows[:, :, None] & cols[:, None, :]).any(axis=0)


def peak_pixel(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, col) of the heat map's peak. An upsampled coarse map has flat tops: then the middle of the pixels
    that share the maximum, not the first of them (which would favour the top-left corner)."""
    top = np.argwhere(heatmap >= heatmap.max() - 1e-6)
    row, col = np.rint(top.mean(axis=0)).astype(int)
    return int(row), int(col)


def peak_inside(heatmap: np.ndarray, boxes: np.ndarray) -> bool:
    """Whether the heat map's peak pixel overlaps one of ``boxes`` (canvas coordinates)."""
    return bool(box_mask(boxes, heatmap.shape[0])[peak_pixel(heatmap)])


def mass_inside(heatmap: np.ndarray, boxes: np.ndarray) -> float:
    """Share of the heat map's total inside the boxes (0 for an empty map)."""
    total = float(heatmap.sum())
    return float(heatmap[box_mask(boxes, heatmap.shape[0])].sum()) / total if total > 0 else 0.0


def random_point_share(boxes: np.ndarray, canvas_size: int) -> float:
    """The chance that a uniformly random pixel of the canvas lies inside a box: their union's area share."""
    return float(box_mask(boxes, canvas_size).mean())


def localisation_scores(predictor: BoneAgePredictor, canvases: np.ndarray, male: np.ndarray,
                        boxes: list[np.ndarray], methods: Sequence[str]) -> list[LocalisationScore]:
    """The pointing game for each explainer in ``methods`` on ``canvases`` (N, S, S) uint8 with their sexes and
    canvas boxes; ``chosen`` marks the predictor's own explainer."""
    size = canvases.shape[1]
    random_point = float(np.mean([random_point_share(b, size) for b in boxes]))
    scores = []
    for method in methods:
        start = time.perf_counter()
        maps = predictor.heatmaps(canvases, male, method)
        seconds = (time.perf_counter() - start) / max(1, len(canvases))
        scores.append(LocalisationScore(
            method=method, images=len(canvases),
            peak_in_box=float(np.mean([peak_inside(h, b) for h, b in zip(maps, boxes)])),
            random_point=random_point,
            mass_in_boxes=float(np.mean([mass_inside(h, b) for h, b in zip(maps, boxes)])),
            chosen=method == predictor.explainer_name, seconds_per_image=seconds))
    return scores

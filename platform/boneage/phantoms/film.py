"""Expose a :class:`~boneage.phantoms.anatomy.Hand` onto film: pose, X-ray attenuation, and age-free nuisances.

Each solid contributes its attenuation along the beam (the chord length through it, so bones have bright cortical
edges and a darker marrow cavity), the film shows ``1 - exp(-attenuation)``, and then come the things that vary
between real radiographs but say nothing about age: hand size, position and rotation, exposure and contrast,
fog, film borders, a burned-in L marker, blur and noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from boneage.phantoms.anatomy import CORTEX, HAND_LENGTH_MM, MARROW, SOFT_TISSUE, Capsule, Ellipse, Hand, Part

ASPECT = 0.8  # width / height, like most RSNA radiographs
PIVOT_MM = (18.0, 95.0)  # the middle of the hand, placed near the middle of the film


@dataclass(frozen=True)
class Pose:
    """Where the hand lies on the film: millimetres to pixels (image y grows downwards)."""

    scale: float  # pixels per millimetre
    angle: float  # radians, counter-clockwise
    centre: tuple[float, float]  # pixel where PIVOT_MM lands

    def point(self, p: tuple[float, float]) -> tuple[float, float]:
        x, y = p[0] - PIVOT_MM[0], p[1] - PIVOT_MM[1]
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.centre[0] + self.scale * (x * c - y * s), self.centre[1] - self.scale * (x * s + y * c)


def sample_pose(rng: np.random.Generator, height: int) -> Pose:
    """A random hand size, rotation and position on a film ``height`` pixels high: nuisances independent of age."""
    width = round(height * ASPECT)
    hand_px = height * rng.uniform(0.66, 0.84)
    centre = (width * (0.5 + rng.uniform(-0.05, 0.05)), height * (0.47 + rng.uniform(-0.04, 0.04)))
    return Pose(scale=hand_px / HAND_LENGTH_MM, angle=math.radians(rng.uniform(-15.0, 15.0)), centre=centre)


def expose(hand: Hand, pose: Pose, height: int, rng: np.random.Generator) -> np.ndarray:
    """Render the radiograph: ``(height, round(height * ASPECT))`` uint8, bone bright on a dark background."""
    width = round(height * ASPECT)
    bone = np.zeros((height, width), dtype=np.float32)
    soft = np.zeros_like(bone)
    for structure in hand.bones:
        _add_merged(bone, [_to_pixels(p, pose) for p in structure.parts], pose.scale, np.add)
    _add_merged(soft, [_to_pixels(p, pose) for p in hand.soft_tissue], pose.scale, np.maximum, soft_tissue=True)
    film = 1.0 - np.exp(-rng.uniform(0.8, 1.25) * (bone + soft))  # beam hardness (kVp)
    film = _exposure(film, rng)
    film = _blur(film)
    film = _film_borders(film, rng)
    film = _burn_in_marker(film, rng)
    film += rng.normal(0.0, rng.uniform(0.004, 0.025), film.shape).astype(np.float32)
    return (np.clip(film, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def structure_box(parts: list[Part], pose: Pose, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Pixel box ``(x0, y0, x1, y1)`` around the parts, clipped to the image; None if it lies outside."""
    boxes = [_bbox(_to_pixels(p, pose)) for p in parts]
    x0, y0 = max(0, math.floor(min(b[0] for b in boxes))), max(0, math.floor(min(b[1] for b in boxes)))
    x1, y1 = min(width, math.ceil(max(b[2] for b in boxes))), min(height, math.ceil(max(b[3] for b in boxes)))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _to_pixels(part: Part, pose: Pose) -> Part:
    if isinstance(part, Capsule):
        return Capsule(pose.point(part.p0), pose.point(part.p1), part.r0 * pose.scale, part.r_mid * pose.scale,
                       part.r1 * pose.scale, part.cortex, part.flatten)
    return Ellipse(pose.point(part.centre), part.a * pose.scale, part.b * pose.scale, part.angle - pose.angle,
                   part.cortex, part.flatten)


def _bbox(part: Part) -> tuple[float, float, float, float]:
    if isinstance(part, Capsule):
        r = max(part.r0, part.r_mid, part.r1)
        xs, ys = (part.p0[0], part.p1[0]), (part.p0[1], part.p1[1])
        return min(xs) - r, min(ys) - r, max(xs) + r, max(ys) + r
    # Axis-aligned extent of a rotated ellipse ("across" is a, "along" the direction angle is b).
    s, c = math.sin(part.angle), math.cos(part.angle)
    half_x = math.hypot(part.a * c, part.b * s)
    half_y = math.hypot(part.a * s, part.b * c)
    return part.centre[0] - half_x, part.centre[1] - half_y, part.centre[0] + half_x, part.centre[1] + half_y


def _add_merged(film: np.ndarray, parts: list[Part], scale: float, combine, soft_tissue: bool = False) -> None:
    """Add the parts' attenuation to ``film``, merging overlapping parts of one structure with ``max``."""
    height, width = film.shape
    box = [math.floor(min(b[i] for b in map(_bbox, parts))) if i < 2 else
           math.ceil(max(b[i] for b in map(_bbox, parts))) for i in range(4)]
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2] + 1, width), min(box[3] + 1, height)
    if x1 <= x0 or y1 <= y0:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
    merged = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    for part in parts:
        outer, inner = _chords(part, xs, ys)
        if soft_tissue:
            value = SOFT_TISSUE * outer
        else:
            value = CORTEX * outer - (CORTEX - MARROW) * inner
        np.maximum(merged, value / scale, out=merged)  # chords in pixels -> millimetres
    region = film[y0:y1, x0:x1]
    region[...] = combine(region, merged)


def _chords(part: Part, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Path length of the beam through the solid and through its marrow cavity, per pixel (in pixels)."""
    if isinstance(part, Capsule):
        (ax, ay), (bx, by) = part.p0, part.p1
        dx, dy = bx - ax, by - ay
        t = np.clip(((xs - ax) * dx + (ys - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        dist2 = (xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2
        u = 2.0 * t - 1.0  # -1 at p0, +1 at p1: the metaphyses flare near the ends
        radius = (part.r_mid + (part.r0 - part.r_mid) * np.clip(-u, 0, 1) ** 3
                  + (part.r1 - part.r_mid) * np.clip(u, 0, 1) ** 3)
        inner = radius * (1.0 - part.cortex)
        return (2.0 * part.flatten * np.sqrt(np.maximum(radius ** 2 - dist2, 0.0)),
                2.0 * part.flatten * np.sqrt(np.maximum(inner ** 2 - dist2, 0.0)))
    s, c = math.sin(part.angle), math.cos(part.angle)
    rx, ry = xs - part.centre[0], part.centre[1] - ys  # image y grows downwards
    along, across = rx * s + ry * c, rx * c - ry * s
    q2 = (across / part.a) ** 2 + (along / part.b) ** 2
    depth = min(part.a, part.b) * part.flatten
    keep = (1.0 - part.cortex) ** 2
    return (2.0 * depth * np.sqrt(np.maximum(1.0 - q2, 0.0)),
            2.0 * depth * math.sqrt(keep) * np.sqrt(np.maximum(1.0 - q2 / max(keep, 1e-6), 0.0)))


def _exposure(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Background level, contrast, gamma and a fog gradient: how the film was exposed and scanned."""
    film = rng.uniform(0.0, 0.12) + rng.uniform(0.72, 1.0) * film ** rng.uniform(0.8, 1.3)
    height, width = film.shape
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(direction) * np.linspace(-0.5, 0.5, width)[None, :]
            + np.sin(direction) * np.linspace(-0.5, 0.5, height)[:, None])
    return (film + rng.uniform(0.0, 0.08) * ramp).astype(np.float32)


def _blur(film: np.ndarray) -> np.ndarray:
    """A 1-2-1 blur in both directions: the focal spot and screen unsharpness."""
    padded = np.pad(film, 1, mode="edge")
    rows = 0.25 * padded[:-2, :] + 0.5 * padded[1:-1, :] + 0.25 * padded[2:, :]
    return 0.25 * rows[:, :-2] + 0.5 * rows[:, 1:-1] + 0.25 * rows[:, 2:]


def _film_borders(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bright unexposed strips along some edges, as on scanned films."""
    height, width = film.shape
    for side in range(4):
        if rng.random() < 0.25:
            level, depth = rng.uniform(0.7, 1.0), max(1, int(rng.uniform(0.01, 0.05) * width))
            if side == 0:
                film[:depth, :] = level
            elif side == 1:
                film[-depth:, :] = level
            elif side == 2:
                film[:, :depth] = level
            else:
                film[:, -depth:] = level
    return film


def _burn_in_marker(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The technologist's lead 'L' marker, burned in near a random corner."""
    height, width = film.shape
    size = max(6, int(height * rng.uniform(0.05, 0.09)))
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    margin = int(width * rng.uniform(0.03, 0.08))
    x = margin if rng.random() < 0.5 else width - margin - size
    y = margin if rng.random() < 0.7 else height - margin - size
    draw.text((x, y), "L", fill=int(255 * rng.uniform(0.8, 1.0)), font=ImageFont.load_default(size=size))
    return np.maximum(film, np.asarray(layer, dtype=np.float32) / 255.0)

"""How a hand's bones look at a given bone age: appearance, growth and fusion of ossification centres.

Ages are in months of *bone age*. Event ages follow the order and typical ages of the Greulich & Pyle atlas
(Greulich W. W., Pyle S. I., *Radiographic Atlas of Skeletal Development of the Hand and Wrist*, 2nd ed., Stanford
University Press, 1959): each structure has a boys' and a girls' age; girls mature 1-2 years earlier. Every function
here is a deterministic function of (bone age, sex): the phantom's maturity is its true bone age, so the only noise
between image and label is the rater noise added to the label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Ages (months) at which a centre appears, reaches the width of its shaft, and fuses; per sex."""

    appear: tuple[float, float]  # (boys, girls)
    full_width: tuple[float, float] = (132.0, 108.0)
    fuse: tuple[float, float] | None = None  # None: a carpal bone, never fuses

    def at(self, male: bool) -> tuple[float, float, float | None]:
        i = 0 if male else 1
        return self.appear[i], self.full_width[i], None if self.fuse is None else self.fuse[i]


# Carpal ossification centres, in order of appearance.
CARPAL_TIMING = {
    "capitate": Timing((3, 2)),
    "hamate": Timing((4, 3)),
    "triquetrum": Timing((24, 18)),
    "lunate": Timing((48, 30)),
    "scaphoid": Timing((66, 48)),
    "trapezium": Timing((72, 48)),
    "trapezoid": Timing((72, 48)),
    "pisiform": Timing((132, 114)),
}
# The thumb's adductor sesamoid: a classic sign that puberty has begun.
SESAMOID_TIMING = Timing((156, 132))

# Distal radius first (about a year), distal ulna at 5-7 years; they fuse last of all.
RADIUS_TIMING = Timing((14, 10), full_width=(120, 100), fuse=(216, 198))
ULNA_TIMING = Timing((78, 66), full_width=(144, 120), fuse=(216, 198))

# Hand epiphyses appear between 1 and 3 years: middle finger first, fifth last, its middle phalanx very last.
# They fuse distal phalanges first, then metacarpals and proximal/middle phalanges.
_BONE_APPEAR_BOYS = {"metacarpal": 20.0, "proximal": 16.0, "middle": 26.0, "distal": 22.0}
_FINGER_DELAY_BOYS = {"thumb": 5.0, "index": 3.0, "middle": 0.0, "ring": 2.0, "little": 6.0}
_GIRLS_FACTOR = 0.72
_FUSE = {"distal": (186.0, 162.0), "proximal": (198.0, 174.0), "middle": (198.0, 174.0),
         "metacarpal": (198.0, 174.0)}


def hand_epiphysis_timing(finger: str, bone: str) -> Timing:
    """Timing of the epiphysis of one metacarpal or phalanx."""
    boys = _BONE_APPEAR_BOYS[bone] + _FINGER_DELAY_BOYS[finger]
    if finger == "little" and bone == "middle":
        boys += 6.0
    return Timing((boys, boys * _GIRLS_FACTOR), fuse=_FUSE[bone])


def maturity_fraction(bone_age: float, male: bool) -> float:
    """0 at birth, 1 at skeletal maturity (18 years boys, 16 girls): drives slow continuous changes."""
    return float(np.clip(bone_age / (216.0 if male else 192.0), 0.0, 1.0))


def carpal_size(bone_age: float, male: bool, name: str) -> float:
    """Fraction of adult size of a carpal bone: 0 before it appears, a small dot at first, 1 when mature."""
    appear, _, _ = CARPAL_TIMING[name].at(male)
    return centre_size(bone_age, appear, mature=180.0 if male else 156.0)


def centre_size(bone_age: float, appear: float, mature: float) -> float:
    """A round centre that appears as a dot at ``appear`` and grows to full size at ``mature``."""
    if bone_age < appear:
        return 0.0
    progress = np.clip((bone_age - appear) / max(mature - appear, 1.0), 0.0, 1.0)
    return float(0.18 + 0.82 * progress ** 0.7)


@dataclass(frozen=True)
class EpiphysisState:
    """What an epiphysis looks like: absent, or a width relative to its metaphysis and a physis gap."""

    present: bool
    width: float = 0.0  # relative to the metaphysis: < 1 growing, 1 as wide as the shaft, > 1 capping it
    gap: float = 1.0  # physis (growth plate) gap, relative to its open width: 1 open, 0 fused

    @property
    def fused(self) -> bool:
        return self.present and self.gap <= 0.0


def epiphysis_state(bone_age: float, male: bool, timing: Timing) -> EpiphysisState:
    """Appearance, widening until as wide as the shaft, capping, then the growth plate narrowing to fusion."""
    appear, full_width, fuse = timing.at(male)
    if bone_age < appear:
        return EpiphysisState(present=False)
    growth = np.clip((bone_age - appear) / (full_width - appear), 0.0, 1.0)
    width = 0.3 + 0.7 * growth ** 0.8
    if fuse is not None and bone_age > full_width:
        width += 0.12 * np.clip((bone_age - full_width) / max(fuse - 24.0 - full_width, 1.0), 0.0, 1.0)
    gap = 1.0 if fuse is None else float(np.clip((fuse - bone_age) / 24.0, 0.0, 1.0))
    return EpiphysisState(present=True, width=float(width), gap=gap)

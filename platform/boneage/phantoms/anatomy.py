"""A left hand (PA view, thumb on the image's right) at a given bone age, as simple solid primitives in millimetres.

Coordinates: origin at the middle of the distal radius's joint surface, +y towards the fingertips, +x towards the
thumb. Sizes are those of an adult hand; the renderer scales the whole hand to a random size in the image, so
absolute size carries no age signal. Age lives in what a radiologist reads: which ossification centres are present,
how big they are, how wide the epiphyses are relative to their shafts, whether growth plates are open, and how much
of each bone is ossified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from boneage.phantoms import maturity as mat

# Linear attenuation per millimetre of tissue (arbitrary units chosen so the film looks right).
CORTEX = 0.11
MARROW = 0.03
SOFT_TISSUE = 0.017
JOINT_GAP_MM = 2.5
PHYSIS_GAP_MM = 1.3


@dataclass(frozen=True)
class Capsule:
    """A solid rod from ``p0`` to ``p1`` with radius ``r0`` at p0, ``r_mid`` along the shaft, ``r1`` at p1."""

    p0: tuple[float, float]
    p1: tuple[float, float]
    r0: float
    r_mid: float
    r1: float
    cortex: float = 0.3  # cortical shell thickness as a fraction of the radius
    flatten: float = 1.0  # thickness along the beam relative to the width (soft tissue is flatter than round)


@dataclass(frozen=True)
class Ellipse:
    """A solid ellipsoid: half-axes ``a`` across and ``b`` along the direction ``angle`` (radians from +y)."""

    centre: tuple[float, float]
    a: float
    b: float
    angle: float
    cortex: float = 0.3
    flatten: float = 1.0  # half-thickness along the beam, relative to the smaller half-axis


Part = Capsule | Ellipse


@dataclass
class Structure:
    """One bone (its parts are merged, so a fused epiphysis joins its shaft seamlessly)."""

    name: str
    parts: list[Part]
    age_parts: list[Part] = field(default_factory=list)  # the age-bearing parts: where a reader should look


@dataclass
class Hand:
    bones: list[Structure]
    soft_tissue: list[Part]


@dataclass(frozen=True)
class Digit:
    name: str
    base: tuple[float, float]  # base of the metacarpal
    angle_deg: float  # direction from +y towards +x
    bones: tuple[tuple[str, float, float], ...]  # (bone, length mm, shaft half-width mm), base to tip
    knuckle_bend_deg: float  # the phalanges turn by this much towards the middle finger


DIGITS = (
    Digit("thumb", (17.0, 25.0), 36.0, (("metacarpal", 45, 4.6), ("proximal", 31, 4.2), ("distal", 24, 3.6)), 10.0),
    Digit("index", (11.0, 33.0), 8.0,
          (("metacarpal", 68, 4.2), ("proximal", 40, 3.9), ("middle", 23, 3.3), ("distal", 17, 2.9)), 3.0),
    Digit("middle", (1.5, 35.0), 1.0,
          (("metacarpal", 64, 4.3), ("proximal", 44, 4.0), ("middle", 27, 3.4), ("distal", 19, 3.0)), 0.5),
    Digit("ring", (-7.5, 33.0), -7.0,
          (("metacarpal", 58, 3.7), ("proximal", 41, 3.8), ("middle", 26, 3.2), ("distal", 19, 2.9)), -3.0),
    Digit("little", (-15.0, 30.0), -15.0,
          (("metacarpal", 53, 3.4), ("proximal", 33, 3.3), ("middle", 18, 2.8), ("distal", 17, 2.6)), -6.0),
)

# Adult carpal bones: centre (x, y), half-axes across/along, angle in degrees.
CARPALS = {
    "capitate": ((1.0, 22.0), 6.0, 10.5, 0.0),
    "hamate": ((-10.0, 21.0), 6.5, 9.0, 12.0),
    "triquetrum": ((-12.5, 10.0), 5.5, 5.0, -30.0),
    "lunate": ((-2.0, 8.5), 6.5, 5.5, 0.0),
    "scaphoid": ((10.0, 10.0), 5.0, 9.5, -55.0),
    "trapezium": ((17.5, 21.0), 6.0, 6.5, 35.0),
    "trapezoid": ((10.0, 24.0), 4.5, 5.5, 10.0),
    "pisiform": ((-14.5, 12.0), 4.0, 4.5, 0.0),
}

HAND_LENGTH_MM = 205.0  # distal radius to the tip of the middle finger, adult


def build_hand(bone_age: float, male: bool, rng: np.random.Generator) -> Hand:
    """The bones and soft tissue of a hand of this bone age; ``rng`` only varies the pose (no age signal)."""
    m = mat.maturity_fraction(bone_age, male)
    bones: list[Structure] = []
    soft: list[Part] = []
    bones += _forearm(bone_age, male, m)
    bones += _carpals(bone_age, male)
    chubby = 1.0 + 0.25 * (1.0 - m)  # infants' fingers carry more soft tissue around slimmer bones
    for digit in DIGITS:
        spread = rng.normal(0.0, 5.0 if digit.name == "thumb" else 1.5)
        finger_bones, tip = _digit(digit, digit.angle_deg + spread, bone_age, male, m, rng)
        bones += finger_bones
        base = digit.base
        width = digit.bones[1][2] * 2.1 * chubby
        soft.append(Capsule(base, tip, width * 1.3, width, width * 0.85, cortex=1.0))
        if digit.name == "thumb":
            bones.append(_sesamoid(finger_bones[0], bone_age, male))
    soft.append(Capsule((0.0, -140.0), (0.0, 5.0), 27.0, 27.0, 31.0, cortex=1.0, flatten=0.5))  # forearm, wrist
    soft.append(Ellipse((1.0, 55.0), 35.0, 50.0, 0.0, cortex=1.0, flatten=0.35))  # palm
    soft.append(Ellipse((20.0, 40.0), 13.0, 26.0, math.radians(30.0), cortex=1.0, flatten=0.7))  # thenar
    return Hand(bones=[b for b in bones if b.parts], soft_tissue=soft)


def _direction(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([math.sin(a), math.cos(a)])


def _long_bone(name: str, start: np.ndarray, end: np.ndarray, half_width: float, flare: tuple[float, float],
               epiphysis_at_start: bool, state: mat.EpiphysisState, m: float, round_epiphysis: bool,
               flatten: float = 1.0) -> Structure:
    """A shaft between two joints with its epiphysis (if ossified) at one end, behind an open or fused physis.

    Young bones are ossified over less of their length: cartilage (invisible) fills the ends.
    """
    length = float(np.linalg.norm(end - start))
    axis = (end - start) / length
    epi_zone = length * (0.07 + 0.13 * (1.0 - m))
    other_zone = length * 0.05 * (1.0 - m)
    width = half_width * (0.8 + 0.2 * m)  # bones widen relative to their length as they mature
    r_start, r_end = width * flare[0], width * flare[1]
    cortex = 0.22 + 0.18 * m
    if epiphysis_at_start:
        p0, p1 = start + axis * epi_zone, end - axis * other_zone
        metaphysis, outward = p0, -axis
        r_meta = r_start
    else:
        p0, p1 = start + axis * other_zone, end - axis * epi_zone
        metaphysis, outward = p1, axis
        r_meta = r_end
    shaft = Capsule(tuple(p0), tuple(p1), r_start, width, r_end, cortex=cortex, flatten=flatten)
    bone = Structure(name, [shaft])
    if state.present:
        a = r_meta * state.width
        b = a * (0.7 if round_epiphysis else 0.3 + 0.12 * m)
        gap = PHYSIS_GAP_MM * state.gap - (0.6 if state.fused else 0.0)  # fused: overlaps and merges
        centre = metaphysis + outward * (gap + b)
        angle = math.atan2(outward[0], outward[1])
        epiphysis = Ellipse(tuple(centre), a, b, angle, cortex=cortex, flatten=flatten)
        bone.parts.append(epiphysis)
        # The reader looks at the epiphysis and its growth plate: include the metaphysis end in the box.
        bone.age_parts += [epiphysis, Ellipse(tuple(metaphysis), r_meta, gap / 2 + 0.5, angle)]
    return bone


def _digit(digit: Digit, angle: float, bone_age: float, male: bool, m: float,
           rng: np.random.Generator) -> tuple[list[Structure], tuple[float, float]]:
    bones = []
    point = np.array(digit.base)
    for bone, length, half_width in digit.bones:
        axis = _direction(angle)
        end = point + axis * length
        at_base = bone != "metacarpal" or digit.name == "thumb"  # finger metacarpals grow at their heads
        flare = {"metacarpal": (1.1, 1.25), "distal": (1.25, 1.0)}.get(bone, (1.2, 1.05))
        state = mat.epiphysis_state(bone_age, male, mat.hand_epiphysis_timing(digit.name, bone))
        bones.append(_long_bone(f"{digit.name}-{bone}", point, end, half_width, flare, at_base, state, m,
                                round_epiphysis=not at_base))
        point = end + axis * JOINT_GAP_MM
        # Fingers converge a little beyond the knuckles, with a slight random bend at each joint.
        angle += rng.normal(0.0, 1.0) - (digit.knuckle_bend_deg if bone == "metacarpal" else 0.0)
    return bones, tuple(point)


def _forearm(bone_age: float, male: bool, m: float) -> list[Structure]:
    radius = _long_bone("radius", np.array([11.0, -140.0]), np.array([11.0, 0.0]), 7.5, (1.0, 1.55), False,
                        mat.epiphysis_state(bone_age, male, mat.RADIUS_TIMING), m, round_epiphysis=False,
                        flatten=0.6)  # the distal radius is broad but thin front to back
    ulna = _long_bone("ulna", np.array([-12.0, -140.0]), np.array([-12.0, -4.0]), 5.0, (1.0, 1.3), False,
                      mat.epiphysis_state(bone_age, male, mat.ULNA_TIMING), m, round_epiphysis=False, flatten=0.8)
    return [radius, ulna]


def _carpals(bone_age: float, male: bool) -> list[Structure]:
    bones = []
    for name, (centre, a, b, angle) in CARPALS.items():
        size = mat.carpal_size(bone_age, male, name)
        if size == 0.0:
            continue
        # A new centre is a round dot; it takes on the bone's adult shape as it grows.
        mean = (a + b) / 2
        shape = Ellipse(centre, size * (mean + (a - mean) * size), size * (mean + (b - mean) * size),
                        math.radians(angle), cortex=0.3, flatten=0.7)
        bones.append(Structure(f"carpal-{name}", [shape], [shape]))
    return bones


def _sesamoid(thumb_metacarpal: Structure, bone_age: float, male: bool) -> Structure:
    appear, _, _ = mat.SESAMOID_TIMING.at(male)
    size = mat.centre_size(bone_age, appear, mature=appear + 36.0)
    if size == 0.0:
        return Structure("sesamoid", [])
    shaft = thumb_metacarpal.parts[0]
    head = np.array(shaft.p1)
    axis = head - np.array(shaft.p0)
    axis /= np.linalg.norm(axis)
    ulnar = np.array([-axis[1], axis[0]])  # perpendicular to the thumb, towards the little finger
    centre = head + ulnar * shaft.r1 * 0.7 - axis * 1.0
    shape = Ellipse(tuple(centre), 2.6 * size, 3.0 * size, 0.0)
    return Structure("sesamoid", [shape], [shape])

"""Images that are not left-hand radiographs, for measuring out-of-distribution rejection (:mod:`boneage.ood`).

:func:`ood_corpus` makes them all by code, no downloads: blank films, noise, rendered text, natural photographs
(scikit-image's bundled samples: the test and bench extras install it), a chest-like radiograph drawn with the
phantom film code, and two altered phantom hands, mirrored (a right hand) and inverted (a negative film). Each is
encoded as a PNG, decoded and framed as every real upload is, but without the reader's content checks
(:func:`boneage.imaging.check_content`): those refuse blank films (and some text pages) before any model sees
them, and the corpus measures the detector itself.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from boneage.imaging import decode_grayscale, fit_to_square
from boneage.phantoms.anatomy import Capsule, Ellipse, Hand, Structure
from boneage.phantoms.film import ASPECT, PIVOT_MM, Pose, expose
from boneage.phantoms.generate import make_phantom

CHEST_HEIGHT_MM = 380.0  # neck to diaphragm and a margin: what the film spans
FILM_PX = 256  # every corpus image is drawn at this height, then framed to the model's size
# Bundled with scikit-image (no download): photographs and textures, none of them a radiograph
PHOTOGRAPHS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "horse", "hubble_deep_field",
               "immunohistochemistry", "clock", "grass", "gravel", "brick", "cell", "retina")
WORDS = "bone age hand radiograph report patient left wrist normal findings impression date".split()


def build_chest(rng: np.random.Generator) -> Hand:
    """A PA chest as the film code's solids (a :class:`Hand` is any set of bones over soft tissue): spine, ribs
    curving down from it, clavicles, a heart shadow, over a torso. Millimetres, centred on the film's pivot."""
    cx, cy = PIVOT_MM
    bones = [Structure(f"vertebra{k}", [Ellipse((cx, cy + y), 17.0, 10.0, 0.0, cortex=0.35)])
             for k, y in enumerate(np.arange(-170.0, 170.0, 25.0))]
    for side in (-1.0, 1.0):
        for k in range(10):
            top = 125.0 - 27.0 * k + rng.uniform(-3, 3)
            t = np.linspace(0.0, 1.0, 7)
            xs = cx + side * (15.0 + (120.0 + 4.0 * k) * t)
            ys = cy + top + 25.0 * np.sin(math.pi * 0.9 * t) - 70.0 * t ** 2
            bones.append(Structure(f"rib{k}", [Capsule((xs[i], ys[i]), (xs[i + 1], ys[i + 1]), 4.5, 4.0, 4.5)
                                               for i in range(len(t) - 1)]))
        bones.append(Structure("clavicle", [Capsule((cx + side * 15.0, cy + 150.0), (cx + side * 135.0, cy + 168.0),
                                                    7.0, 5.5, 7.0)]))
    bones.append(Structure("heart", [Ellipse((cx - 25.0, cy - 60.0), 70.0, 60.0, 0.3, cortex=1.0, flatten=0.08)]))
    torso = [Ellipse((cx, cy - 10.0), 165.0, 200.0, 0.0, flatten=0.2)]  # about 65 mm of water-like tissue
    return Hand(bones=bones, soft_tissue=torso)


def chest_film(rng: np.random.Generator, height: int = FILM_PX) -> np.ndarray:
    """A chest-like radiograph ``(height, height * ASPECT)`` uint8, exposed like a phantom hand."""
    pose = Pose(scale=height / CHEST_HEIGHT_MM, angle=math.radians(rng.uniform(-5, 5)),
                centre=(height * ASPECT * 0.5, height * 0.5))
    return expose(build_chest(rng), pose, height, rng)


def ood_corpus(size: int, seed: int = 0, per_kind: int = 12) -> dict[str, np.ndarray]:
    """Each kind of non-hand image as ``(K, size, size)`` uint8 canvases framed like a real upload: ``blank``,
    ``uniform_noise``, ``gaussian_noise``, ``text``, ``photograph``, ``chest``, ``inverted_hand``, and
    ``mirrored_hand`` (a right hand: :mod:`boneage.ood` accepts it, see there)."""
    rng = np.random.default_rng(seed)
    hands = [make_phantom(index, seed, FILM_PX, label_noise_sd=0.0).image for index in range(per_kind)]
    films = {
        "blank": [np.full((FILM_PX, round(FILM_PX * ASPECT)), level, np.uint8)
                  for level in np.linspace(0, 255, per_kind).round()],
        "uniform_noise": [rng.integers(0, 256, _film_shape(rng), dtype=np.uint8) for _ in range(per_kind)],
        "gaussian_noise": [np.clip(rng.normal(rng.uniform(60, 190), rng.uniform(10, 60), _film_shape(rng)), 0, 255)
                           .astype(np.uint8) for _ in range(per_kind)],
        "text": [_text_page(rng) for _ in range(per_kind)],
        "photograph": _photographs(),
        "chest": [chest_film(rng) for _ in range(per_kind)],
        "inverted_hand": [255 - hand for hand in hands],
        "mirrored_hand": [np.ascontiguousarray(hand[:, ::-1]) for hand in hands],
    }
    return {kind: np.stack([fit_to_square(decode_grayscale(_png(image)), size) for image in images])
            for kind, images in films.items()}


def _film_shape(rng: np.random.Generator) -> tuple[int, int]:
    return FILM_PX, int(FILM_PX * rng.uniform(0.6, 1.4))


def _text_page(rng: np.random.Generator) -> np.ndarray:
    """Lines of words, dark on light or light on dark, like a scanned report or a screenshot."""
    dark = rng.random() < 0.5
    page = Image.new("L", (round(FILM_PX * ASPECT), FILM_PX), 20 if dark else 235)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=int(rng.integers(10, 24)))
    for y in range(8, FILM_PX - 16, int(rng.integers(16, 30))):
        draw.text((8, y), " ".join(rng.choice(WORDS, 5)), fill=230 if dark else 25, font=font)
    return np.asarray(page)


def _photographs() -> list[np.ndarray]:
    """scikit-image's bundled photographs (imported here: only the tests and the bench need it)."""
    import skimage.data

    return [np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("L")) for name in PHOTOGRAPHS]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()

"""Decode a radiograph file (PNG 8/16-bit, palette, RGB(A), JPEG, DICOM) to a uint8 square canvas.

Every failure raises :class:`ImageRejected` with a reason code (``undecodable_image``, ``truncated_image``,
``decompression_bomb``) so the prepare job can report the file instead of crashing or dropping it. Resizing keeps
the aspect ratio and pads with black to a square: hands are never squashed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from boneage.deid import read_dicom

REJECT_UNDECODABLE = "undecodable_image"
REJECT_TRUNCATED = "truncated_image"
REJECT_BOMB = "decompression_bomb"

DICOM_MAGIC_OFFSET = 128
PREPROCESSING = {
    "grayscale": "8-bit kept; 16-bit and DICOM windowed (DICOM: modality + VOI LUT) then min-max to 0-255; "
                 "MONOCHROME1 inverted; colour to luminance; transparency over black",
    "resize": "longest side to image_size, bilinear with antialiasing, aspect ratio kept",
    "pad": "centred on a black square canvas",
    "dtype": "uint8",
}

# Truncated files must fail loudly, whatever another library set globally.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(ValueError):
    """A file that cannot become a training image; ``reason`` is ``<code>: <detail>``."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.reason = f"{code}: {detail}"


def load_radiograph(source: str | Path | bytes, size: int, max_megapixels: float = 64.0) -> np.ndarray:
    """Read ``source`` (a path or the file's bytes) into a ``(size, size)`` uint8 array, hand centred: the model
    canvas. Prepare, the service and bulk scoring all frame files with this, so a model sees the same pixels in
    each."""
    return load_radiograph_sizes(source, (size,), max_megapixels)[0]


def load_radiograph_sizes(source: str | Path | bytes, sizes: Sequence[int],
                          max_megapixels: float = 64.0) -> list[np.ndarray]:
    """``source`` framed on square canvases of each of ``sizes``, each exactly what :func:`load_radiograph` gives
    at that size. A JPEG is decoded once per size (its draft, a decode at a reduced scale, depends on the size,
    and so do the pixels); any other file once."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    if is_jpeg(data):
        return [fit_to_square(decode_grayscale(data, max_megapixels, draft_size=size), size) for size in sizes]
    gray = decode_grayscale(data, max_megapixels)
    return [fit_to_square(gray, size) for size in sizes]


def decode_grayscale(data: bytes, max_megapixels: float = 64.0, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an 8-bit grayscale PIL image (mode ``L``) at full resolution.

    ``draft_size`` lets JPEG decoding skip detail below that size (much faster for large JPEGs).
    """
    if not data:
        raise ImageRejected(REJECT_UNDECODABLE, "empty file")
    if is_dicom(data):
        return _decode_dicom(data, max_megapixels)
    return _decode_pil(data, max_megapixels, draft_size)


@dataclass(frozen=True)
class SquareFit:
    """Where :func:`fit_to_square` puts an image on its canvas: the resized image's size and its top-left corner."""

    width: int  # of the resized image, canvas pixels
    height: int
    left: int  # black padding left of it
    top: int  # black padding above it

    def to_canvas(self, boxes: np.ndarray, image_width: int, image_height: int) -> np.ndarray:
        """Boxes ``(K, 4)`` x0, y0, x1, y1 in the original image's pixel coordinates -> the same in canvas
        coordinates (float: the edges of pixel areas, so a box covering pixels 0..9 is 0, 10)."""
        scale = np.array([self.width / image_width, self.height / image_height] * 2)
        return np.asarray(boxes, dtype=np.float64) * scale + np.array([self.left, self.top] * 2)


def square_fit(width: int, height: int, size: int) -> SquareFit:
    """The one place for the canvas geometry: longest side to ``size``, aspect ratio kept, centred."""
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return SquareFit(new_w, new_h, (size - new_w) // 2, (size - new_h) // 2)


def fit_to_square(image: Image.Image, size: int) -> np.ndarray:
    """Scale the longest side to ``size`` keeping the aspect ratio, centre on a black canvas: ``(size, size)`` uint8."""
    fit = square_fit(*image.size, size)
    # reducing_gap: integer box-reduction first, then bilinear; near-identical output, several times faster.
    resized = image.resize((fit.width, fit.height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    canvas = np.zeros((size, size), dtype=np.uint8)
    canvas[fit.top:fit.top + fit.height, fit.left:fit.left + fit.width] = np.asarray(resized, dtype=np.uint8)
    return canvas


def is_jpeg(data: bytes) -> bool:
    """JPEG files start with an SOI marker and another marker (what PIL itself checks)."""
    return data[:3] == b"\xff\xd8\xff"


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble."""
    return data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _check_pixels(width: int, height: int, frames: int, max_megapixels: float) -> None:
    megapixels = width * height * frames / 1e6
    if megapixels > max_megapixels:
        raise ImageRejected(REJECT_BOMB, f"{width}x{height}x{frames} = {megapixels:.1f} megapixels exceeds the "
                                         f"limit of {max_megapixels:g} (data.max_image_megapixels)")


def _decode_pil(data: bytes, max_megapixels: float, draft_size: int | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image.width, image.height, 1, max_megapixels)  # header only: nothing decoded yet
        if image.format == "JPEG" and draft_size:
            image.draft("L", (draft_size, draft_size))
        image.load()
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        code = REJECT_BOMB if isinstance(err, Image.DecompressionBombError) else REJECT_UNDECODABLE
        raise ImageRejected(code, str(err)) from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        text = str(err)
        code = REJECT_TRUNCATED if "truncated" in text or isinstance(err, EOFError) else REJECT_UNDECODABLE
        if "Decompressed Data Too Large" in text:  # PNG text-chunk bomb
            code = REJECT_BOMB
        raise ImageRejected(code, f"{type(err).__name__}: {text}") from err
    return _to_gray8(image)


def _to_gray8(image: Image.Image) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_minmax_to_uint8(np.asarray(image, dtype=np.float32)))
    if image.mode == "P" and "transparency" not in image.info:
        return image.convert("L")
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        # Transparent background (e.g. segmented hands) becomes black, the radiograph's own background.
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return image.convert("L")


def _decode_dicom(data: bytes, max_megapixels: float) -> Image.Image:
    """The radiograph of a DICOM file, read through :func:`boneage.deid.read_dicom`: no identifying element is
    ever parsed, so no reject reason, warning or exception can quote one."""
    try:
        ds = read_dicom(data)
        _check_pixels(int(ds.Columns), int(ds.Rows), int(ds.get("NumberOfFrames", 1) or 1), max_megapixels)
        values = _windowed(_first_frame(ds.pixel_array, ds), ds)
    except ImageRejected:
        raise
    except Exception as err:  # pydicom raises many types for corrupt or unsupported files (and LUT values)
        code = REJECT_TRUNCATED if "truncat" in str(err).lower() or isinstance(err, EOFError) else REJECT_UNDECODABLE
        raise ImageRejected(code, f"DICOM {type(err).__name__}: {err}") from err
    gray = _minmax_to_uint8(values)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: high values are dark; flip so bone is bright as in every PNG
    return Image.fromarray(gray)


def _first_frame(pixels: np.ndarray, ds) -> np.ndarray:
    """The (H, W) grayscale radiograph of decoded pixel data: a multi-frame file's first frame."""
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise ImageRejected(REJECT_UNDECODABLE, f"DICOM pixel data of shape {pixels.shape} is not grayscale")
    return pixels


def _windowed(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored pixels through the modality and VOI LUTs, as float32."""
    return apply_voi_lut(_modality_values(pixels, ds), ds).astype(np.float32)


def _modality_values(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored pixels in the modality's units (rescale slope and intercept, or a modality LUT). A VOI LUT table is
    indexed by whole modality values, so before one they are rounded (a fractional rescale would mis-index it)."""
    values = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds and values.dtype.kind == "f":
        values = np.rint(values).astype(np.int32)
    return values


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)

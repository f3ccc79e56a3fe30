"""Decode a radiograph file (PNG 8/16-bit, palette, RGB(A), JPEG, DICOM) to a uint8 square canvas.

Every failure raises :class:`ImageRejected` with a reason code (:data:`REJECT_CODES`) so the prepare job can report
the file instead of crashing or dropping it, and the service can answer why. The rules are here, once, for every
reader: only PNG, JPEG and DICOM (by their first bytes, whatever the file is called); nothing larger than the
megapixel limit (checked from the header, before decoding); PNG chunks that fail their CRC; nothing under
:data:`MIN_SIDE` pixels a side; nothing without contrast (a blank film, or 16-bit values squeezed to one grey by a
few extreme pixels) or with fewer than :data:`MIN_LEVELS` grey levels; one grayscale frame per DICOM file. Resizing keeps
the aspect ratio and pads with black to a square: hands are never squashed.
"""

from __future__ import annotations

import io
import zlib
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
REJECT_NOT_IMAGE = "not_an_image"
REJECT_FORMAT = "unsupported_image_format"
REJECT_TOO_SMALL = "image_too_small"
REJECT_BLANK = "blank_image"
REJECT_LEVELS = "too_few_grey_levels"
REJECT_DICOM = "unsupported_dicom"
REJECT_CODES = (REJECT_UNDECODABLE, REJECT_TRUNCATED, REJECT_BOMB, REJECT_NOT_IMAGE, REJECT_FORMAT, REJECT_TOO_SMALL,
                REJECT_BLANK, REJECT_LEVELS, REJECT_DICOM)
ACCEPTED_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG; DICOM is told by its preamble
MIN_SIDE = 16  # pixels: smaller holds no hand to read
MIN_CONTRAST = 8  # grey levels between the 1st and 99th percentiles; a radiograph spans well over 100
MIN_LEVELS = 16  # distinct grey levels: a 1-, 2- or 4-bit image is a drawing or a mask, not a radiograph

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
        grays = [decode_grayscale(data, max_megapixels, draft_size=size) for size in sizes]
    else:
        grays = [decode_grayscale(data, max_megapixels)] * len(sizes)
    check_content(grays[0])  # a JPEG's drafts differ only in scale
    return [fit_to_square(gray, size) for gray, size in zip(grays, sizes)]


def decode_grayscale(data: bytes, max_megapixels: float = 64.0, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an 8-bit grayscale PIL image (mode ``L``) at full resolution; what it shows is
    :func:`check_content`'s to judge.

    ``draft_size`` lets JPEG decoding skip detail below that size (much faster for large JPEGs).
    """
    if not data:
        raise ImageRejected(REJECT_UNDECODABLE, "empty file")
    check_format(data)
    return _decode_dicom(data, max_megapixels) if is_dicom(data) else _decode_pil(data, max_megapixels, draft_size)


def check_format(data: bytes) -> None:
    """Refuse anything but PNG, JPEG and DICOM, by the file's first bytes (a zip or an HTML page called .png is
    refused as not an image; a GIF or TIFF as an unsupported format, named)."""
    if data.startswith(ACCEPTED_MAGIC) or is_dicom(data):
        return
    try:
        found = Image.open(io.BytesIO(data)).format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        found = None
    if found:
        raise ImageRejected(REJECT_FORMAT, f"{found} images are not supported: send PNG, JPEG or DICOM")
    raise ImageRejected(REJECT_NOT_IMAGE, "the file is not a PNG, JPEG or DICOM image")


def check_content(gray: Image.Image) -> None:
    """Refuse a decoded image too small to hold a hand, without contrast, or with too few grey levels."""
    width, height = gray.size
    if min(width, height) < MIN_SIDE:
        raise ImageRejected(REJECT_TOO_SMALL, f"{width}x{height} pixels: a radiograph needs at least {MIN_SIDE} "
                                              "pixels a side")
    counts = np.bincount(np.asarray(gray).ravel(), minlength=256)
    shares = np.cumsum(counts) / (width * height)
    low, high = int(np.searchsorted(shares, 0.01)), int(np.searchsorted(shares, 0.99))
    if high - low < MIN_CONTRAST:
        raise ImageRejected(REJECT_BLANK, f"no contrast: 98% of its pixels lie within {high - low + 1} grey levels "
                                          "of 256 (a blank film, or 16-bit values squeezed to one grey by a few "
                                          "extreme pixels: window the image first)")
    if np.count_nonzero(counts) < MIN_LEVELS:
        raise ImageRejected(REJECT_LEVELS, f"only {np.count_nonzero(counts)} grey levels (a radiograph has "
                                           "hundreds): a drawing, a mask or a 1- to 4-bit image")


def _check_png_crcs(data: bytes) -> None:
    """Every PNG chunk's CRC (Pillow checks only some): a corrupted file is refused, never read as a hand."""
    offset = len(ACCEPTED_MAGIC[0])
    while offset + 12 <= len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        end = offset + 8 + length
        if end + 4 > len(data):
            return  # cut short: the decoder reports it as truncated
        if zlib.crc32(data[offset + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            kind = data[offset + 4:offset + 8].decode("latin-1")
            raise ImageRejected(REJECT_UNDECODABLE, f"PNG chunk {kind!r} at byte {offset} fails its CRC: the file "
                                                    "is corrupt")
        offset = end + 4


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
    if data.startswith(ACCEPTED_MAGIC[0]):
        _check_png_crcs(data)
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image.width, image.height, 1, max_megapixels)  # header only: nothing decoded yet
        if image.format == "JPEG" and draft_size:
            image.draft("L", (draft_size, draft_size))
        image.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError as err:  # its message names a memory address: say what it means instead
        raise ImageRejected(REJECT_UNDECODABLE, "the image cannot be read: its header is damaged or cut short") from err
    except Image.DecompressionBombError as err:
        raise ImageRejected(REJECT_BOMB, str(err)) from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        text = str(err)
        code = REJECT_TRUNCATED if "truncated" in text or isinstance(err, EOFError) else REJECT_UNDECODABLE
        if "decompressed data too large" in text.lower():  # PNG text-chunk bomb
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
    ds = None  # for the failure's reason: the transfer syntax, once the header is read
    try:
        ds = read_dicom(data)
        _check_dicom_kind(ds)
        _check_pixels(int(ds.Columns), int(ds.Rows), 1, max_megapixels)
        values = _windowed(_grayscale(ds.pixel_array), ds)
    except ImageRejected:
        raise
    except Exception as err:  # pydicom raises many types for corrupt or unsupported files (and LUT values)
        raise _dicom_failure(err, ds) from err
    gray = _minmax_to_uint8(values)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: high values are dark; flip so bone is bright as in every PNG
    return Image.fromarray(gray)


def _check_dicom_kind(ds) -> None:
    """One grayscale frame of pixel data, or :data:`REJECT_DICOM` saying what the file holds instead."""
    if "PixelData" not in ds:
        raise ImageRejected(REJECT_DICOM, "the DICOM file holds no pixel data (a report or a structured document?)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageRejected(REJECT_DICOM, f"the DICOM file holds {frames} frames: send one radiograph per file")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageRejected(REJECT_DICOM, f"the DICOM image is in colour ({ds.get('PhotometricInterpretation', '?')}"
                                          "): send the grayscale radiograph")


def _dicom_failure(err: Exception, ds) -> ImageRejected:
    """The reason a DICOM file could not be decoded: a compression no installed decoder reads, truncation, or
    anything else pydicom refused."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed and not _decodable(syntax):
        return ImageRejected(REJECT_DICOM, f"its pixel data is compressed as {syntax.name}, which no installed "
                                           "decoder reads: send it uncompressed, or install the decoder "
                                           "(e.g. pylibjpeg-openjpeg for JPEG 2000)")
    code = REJECT_TRUNCATED if "truncat" in str(err).lower() or isinstance(err, EOFError) else REJECT_UNDECODABLE
    return ImageRejected(code, f"DICOM {type(err).__name__}: {err}")


def _decodable(syntax) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:
        return False


def _grayscale(pixels: np.ndarray) -> np.ndarray:
    """The (H, W) radiograph of decoded pixel data (:func:`_check_dicom_kind` has refused several frames and
    colour already; this catches a file whose header said otherwise)."""
    if pixels.ndim != 2:
        raise ImageRejected(REJECT_DICOM, f"DICOM pixel data of shape {pixels.shape} is not one grayscale image")
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

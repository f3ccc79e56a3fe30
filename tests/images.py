"""Writers for every image kind the loader must handle, good and bad (test fixtures, written on the fly)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(height: int = 40, width: int = 30, high: int = 255) -> np.ndarray:
    """A left-to-right ramp 0..high: easy to check orientation, windowing and inversion."""
    return np.tile(np.linspace(0, high, width), (height, 1))


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


def write_png16(path: Path) -> Path:
    # 12-bit data in a 16-bit PNG, as from many digitisers.
    return write_png(path, gradient(high=4095).astype(np.uint16))


def write_palette(path: Path, transparent_background: bool) -> Path:
    """A gray palette PNG; with a transparent background it is like two of the real RSNA files: palette index 0
    is white but fully transparent, and fills the first 5 columns."""
    indices = gradient(high=255).astype(np.uint8)
    image = Image.fromarray(indices, mode="L").convert("P")
    palette = [v for i in range(256) for v in (i, i, i)]
    if transparent_background:
        indices[:, :5] = 0
        image = Image.fromarray(indices, mode="L").convert("P")
        palette[:3] = [255, 255, 255]
    image.putpalette(palette)
    if transparent_background:
        image.save(path, transparency=0)
    else:
        image.save(path)
    return path


def write_rgba(path: Path) -> Path:
    gray = gradient().astype(np.uint8)
    alpha = np.full_like(gray, 255)
    alpha[:, :5] = 0  # transparent strip: must come out black
    rgba = np.stack([gray, gray, gray, alpha], axis=-1)
    return write_png(path, rgba)


def write_jpeg(path: Path) -> Path:
    Image.fromarray(gradient().astype(np.uint8)).convert("RGB").save(path, quality=95)
    return path


def write_dicom(path: Path, photometric: str = "MONOCHROME2", slope: float = 1.0, intercept: float = 0.0,
                rows: int | None = None, columns: int | None = None, window: tuple[float, float] | None = None,
                voi_lut: np.ndarray | None = None) -> Path:
    """An uncompressed 12-bit DICOM radiograph of :func:`gradient` (0..4095); ``rows``/``columns`` can claim a size
    the data doesn't have. ``window`` is (centre, width) in rescaled units; ``voi_lut`` maps every stored value
    0..4095 to an output value (a VOI LUT Sequence item)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import SecondaryCaptureImageStorage

    from boneage.phantoms.dicom import new_dicom

    ds = new_dicom(SecondaryCaptureImageStorage)
    ds.PatientSex = "F"
    ds.set_pixel_data(gradient(high=4095).astype(np.uint16), photometric_interpretation=photometric,
                      bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]  # entries, first stored value mapped, bits per entry
        item.LUTData = np.asarray(voi_lut, dtype="<u2").tobytes()  # OW: 16-bit little-endian words
        ds.VOILUTSequence = [item]
    if rows:
        ds.Rows, ds.Columns = rows, columns
    ds.save_as(path, enforce_file_format=True)
    return path


def write_truncated_png(path: Path) -> Path:
    write_png(path, (np.random.default_rng(0).random((200, 200)) * 255).astype(np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_bomb_png(path: Path, side: int = 100_000) -> Path:
    """A tiny file whose header claims side x side pixels: what a decompression bomb looks like before decoding."""
    write_png(path, np.zeros((8, 8), dtype=np.uint8))
    data = bytearray(path.read_bytes())
    ihdr = 8  # after the PNG signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path

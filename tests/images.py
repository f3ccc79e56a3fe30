"""Writers for every image kind the loader must handle, good and bad (test fixtures, written on the fly)."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
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



# The identified DICOM: a value for every identifying attribute of boneage.deid, a private element and a run of
# stored pixels spelling PIXEL_MARKER, so that a leak of any of them, or of the raw pixel bytes, can be found.
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "MRN-4242-SECRET"
PIXEL_MARKER = b"PIXELBYTES-4242!"  # even length: 8 stored 16-bit pixels
PRIVATE_MARKER = "PRIVATE-4242-SECRET"
_BY_KEYWORD = {"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID, "PatientBirthDate": "20120815",
               "AccessionNumber": "ACC-4242-SECRET", "InstitutionName": "Saint Secret Hospital 4242"}
# Valid values for each VR (pydicom warns, quoting the value, about invalid ones); {i}: 10 + the keyword's index,
# two digits that make valid years and seconds
_BY_VR = {"PN": "Secret{i:02d}^Person", "LO": "SECRET-{i:02d}-4242", "SH": "SECRET-{i:02d}-4242",
          "LT": "SECRET-{i:02d}-4242", "ST": "SECRET-{i:02d}-4242", "DA": "19{i:02d}0117", "TM": "2359{i:02d}.4242",
          "DT": "19{i:02d}0117235959.4242", "UI": "1.2.826.0.1.3680043.9.4242.{i}"}


def identifying_values() -> dict[str, str]:
    """A distinctive valid value for each of ``boneage.deid.IDENTIFYING_KEYWORDS``."""
    from pydicom.datadict import dictionary_VR

    from boneage.deid import IDENTIFYING_KEYWORDS

    return {keyword: _BY_KEYWORD.get(keyword) or _BY_VR[dictionary_VR(keyword)].format(i=i + 10)
            for i, keyword in enumerate(IDENTIFYING_KEYWORDS)}


def identifying_markers() -> list[str]:
    """What must never appear in anything the platform writes or logs: every identifying value, the private
    element's and the raw pixel run."""
    return [*identifying_values().values(), PRIVATE_MARKER, PIXEL_MARKER.decode()]


def write_identified_dicom(path: Path, broken: str = "") -> Path:
    """A 16-bit MONOCHROME2 radiograph of :func:`gradient` (PatientSex F) that carries every identifying value, a
    private element and :data:`PIXEL_MARKER` in its stored pixels. ``broken="pixels"``: its pixel data cut short;
    ``"header"``: the file ends just after the patient's name."""
    from pydicom.uid import SecondaryCaptureImageStorage

    from boneage.phantoms.dicom import new_dicom

    ds = new_dicom(SecondaryCaptureImageStorage)
    for keyword, value in identifying_values().items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.private_block(0x0009, "HOSPITAL EXPORT", create=True).add_new(0x01, "LO", PRIVATE_MARKER)
    ds.PatientSex = "F"
    pixels = gradient(high=60000).astype(np.uint16)
    pixels[0, :len(PIXEL_MARKER) // 2] = np.frombuffer(PIXEL_MARKER, dtype="<u2")
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    ends = {"": len(data), "pixels": len(data) - 500,
            "header": data.index(PATIENT_NAME.encode()) + len(PATIENT_NAME)}[broken]
    path.write_bytes(data[:ends])
    return path


BASE64_PNG = re.compile(rb"iVBORw0KGgo[A-Za-z0-9+/]+=*")  # a PNG's signature in base64, and the rest of it


def readable(data: bytes) -> bytes:
    """``data`` with what a byte search would miss appended: each PNG's text chunks (decompressed), and the same
    for every base64 PNG in it (JSON answers, HTML reports)."""
    pngs = [data] if data.startswith(b"\x89PNG") else [base64.b64decode(m) for m in BASE64_PNG.findall(data)]
    return b"\n".join([data, *pngs, *(repr(Image.open(io.BytesIO(png)).info).encode() for png in pngs)])


def file_text(path: Path) -> bytes:
    """A written file as :func:`readable` bytes; a Parquet file's decoded rows and key-value metadata too (its
    pages may be compressed)."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        data += repr((pq.read_table(path).to_pylist(), pq.read_metadata(path).metadata)).encode()
    return readable(data)


def leaked(data: bytes | str) -> list[str]:
    """The :func:`identifying_markers` in ``data`` (case-insensitive)."""
    text = (data.encode() if isinstance(data, str) else data).lower()
    return [marker for marker in identifying_markers() if marker.lower().encode() in text]


def leaks_in_files(*folders: Path) -> dict[str, list[str]]:
    """Every file under ``folders`` (checked: some exist) that holds a marker, with the markers it holds."""
    files = [path for folder in folders for path in Path(folder).rglob("*") if path.is_file()]
    assert files, f"nothing written under {folders}"
    return {str(path): found for path in files if (found := leaked(file_text(path)))}


def logged(caplog, capfd) -> str:
    """Everything this process logged and printed during the test so far."""
    captured = capfd.readouterr()
    return caplog.text + captured.out + captured.err

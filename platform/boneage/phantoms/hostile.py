"""Hostile and malformed files, made by code (no binaries in the repository), for the reliability tests and
``bench/hostile.py``: truncated files and bad CRCs, wrong magic bytes and other formats under a radiograph's name,
absurd and zero dimensions, decompression bombs, odd bit depths and 16-bit extremes, DICOM files without pixels,
with several frames, in colour or compressed as no installed decoder reads, and empty files.

Every case is a :class:`HostileFile` carrying the reason code (:mod:`boneage.imaging`) that every reader must refuse
it with: the prepare job in its rejects file, the service with a 4xx answer.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin
from pydicom.uid import (ExplicitVRLittleEndian, HTJ2KLossless, JPEG2000Lossless, SecondaryCaptureImageStorage,
                         generate_uid)

from boneage.imaging import (REJECT_BLANK, REJECT_BOMB, REJECT_DICOM, REJECT_FORMAT, REJECT_LEVELS,
                             REJECT_NOT_IMAGE, REJECT_TOO_SMALL, REJECT_TRUNCATED, REJECT_UNDECODABLE)
from boneage.phantoms.dicom import new_dicom

SIDE = 64  # pixels of the cases that are images at all
EMPTY_FILE = "empty_file"  # the service's code for an empty upload (prepare reports it as undecodable_image)


@dataclass(frozen=True)
class HostileFile:
    """One case: a file name (its extension is what the file claims to be), its bytes, the reason code."""

    name: str
    data: bytes
    code: str
    what: str  # a few words for the results table


def hostile_files() -> list[HostileFile]:
    """The whole corpus, in a fixed order (deterministic bytes)."""
    return [*_broken_pngs(), *_impostors(), *_odd_sizes(), *_odd_pixels(), *_broken_jpegs(), *_hostile_dicoms()]


def _png(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _texture(side: int = SIDE, seed: int = 0) -> np.ndarray:
    """Noise with every grey level: a file that passes every content check, to be broken in one way."""
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_header(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with a few bytes of (deflated) data."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def _flip_byte(data: bytes, index: int) -> bytes:
    broken = bytearray(data)
    broken[index] ^= 0xFF
    return bytes(broken)


def _broken_pngs() -> list[HostileFile]:
    good = _png(_texture())
    idat = good.index(b"IDAT")
    idat_length = struct.unpack(">I", good[idat - 4:idat])[0]
    return [
        HostileFile("truncated.png", good[:len(good) // 2], REJECT_TRUNCATED, "PNG cut in half"),
        HostileFile("signature-only.png", good[:8], REJECT_UNDECODABLE, "PNG signature and nothing else"),
        HostileFile("header-only.png", good[:33], REJECT_UNDECODABLE, "PNG signature and IHDR only"),
        HostileFile("bad-ihdr-crc.png", _flip_byte(good, 29), REJECT_UNDECODABLE, "IHDR chunk with a wrong CRC"),
        HostileFile("bad-idat-crc.png", _flip_byte(good, idat + 4 + idat_length), REJECT_UNDECODABLE,
                    "IDAT chunk with a wrong CRC (Pillow does not check it)"),
        HostileFile("flipped-pixels.png", _flip_byte(good, idat + 20), REJECT_UNDECODABLE,
                    "a byte of the compressed pixels flipped (CRC now wrong)"),
        HostileFile("text-bomb.png", _png(_texture(), pnginfo=_text_bomb()), REJECT_BOMB,
                    "zTXt chunk inflating to 64 MB"),
    ]


def _text_bomb() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * (64 * 2**20), zip=True)  # zTXt: compresses to ~64 KB
    return info


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("hand.png", _png(_texture()))
    return buffer.getvalue()


def _other_format(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_texture()).save(buffer, format=kind)
    return buffer.getvalue()


def _impostors() -> list[HostileFile]:
    return [
        HostileFile("empty.png", b"", EMPTY_FILE, "empty file"),
        HostileFile("zip.png", _zip(), REJECT_NOT_IMAGE, "zip archive named .png"),
        HostileFile("page.png", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
                    REJECT_NOT_IMAGE, "HTML page named .png"),
        HostileFile("drawing.png", b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="9" height="9"/></svg>',
                    REJECT_NOT_IMAGE, "SVG named .png"),
        HostileFile("report.png", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", REJECT_NOT_IMAGE,
                    "PDF named .png"),
        HostileFile("zeros.dcm", bytes(1024), REJECT_NOT_IMAGE, "1 KB of zero bytes named .dcm"),
        HostileFile("script.jpg", b"#!/bin/sh\nrm -rf /\n", REJECT_NOT_IMAGE, "shell script named .jpg"),
        HostileFile("gif.png", _other_format("GIF"), REJECT_FORMAT, "GIF named .png"),
        HostileFile("tiff.png", _other_format("TIFF"), REJECT_FORMAT, "TIFF named .png"),
        HostileFile("bmp.jpg", _other_format("BMP"), REJECT_FORMAT, "BMP named .jpg"),
        HostileFile("webp.png", _other_format("WEBP"), REJECT_FORMAT, "WebP named .png"),
    ]


def _odd_sizes() -> list[HostileFile]:
    return [
        HostileFile("zero-width.png", _png_with_header(0, SIDE), REJECT_UNDECODABLE, "PNG header: width 0"),
        HostileFile("zero-height.png", _png_with_header(SIDE, 0), REJECT_UNDECODABLE, "PNG header: height 0"),
        HostileFile("huge.png", _png_with_header(100_000, 100_000), REJECT_BOMB,
                    "PNG header: 100,000 x 100,000 pixels (a decompression bomb)"),
        HostileFile("beyond-png.png", _png_with_header(2**31 + 5, 7), REJECT_BOMB,
                    "PNG header: width over the format's 2^31 - 1"),
        HostileFile("one-pixel.png", _png(np.full((1, 1), 200, np.uint8)), REJECT_TOO_SMALL, "1 x 1 pixel PNG"),
        HostileFile("sliver.png", _png(_texture(1000)[:4]), REJECT_TOO_SMALL, "4 x 1000 pixel PNG"),
    ]


def _odd_pixels() -> list[HostileFile]:
    base = np.random.default_rng(1).integers(1000, 1050, (SIDE, SIDE)).astype(np.uint16)
    spiked = base.copy()
    spiked[0, 0] = 65535  # one saturated pixel squeezes the rest to one grey
    checker = (np.indices((SIDE, SIDE)).sum(axis=0) % 2).astype(np.uint16) * 65535
    return [
        HostileFile("black.png", _png(np.zeros((SIDE, SIDE), np.uint8)), REJECT_BLANK, "all black"),
        HostileFile("white.png", _png(np.full((SIDE, SIDE), 255, np.uint8)), REJECT_BLANK, "all white"),
        HostileFile("nearly-flat.png", _png(np.random.default_rng(2).integers(100, 104, (SIDE, SIDE),
                                                                              dtype=np.uint8)),
                    REJECT_BLANK, "4 grey levels of noise around 100"),
        HostileFile("16bit-saturated.png", _png(np.full((SIDE, SIDE), 65535, np.uint16)), REJECT_BLANK,
                    "16-bit, every pixel 65535"),
        HostileFile("16bit-spike.png", _png(spiked), REJECT_BLANK, "16-bit, one 65535 pixel among values ~1000"),
        HostileFile("16bit-checker.png", _png(checker), REJECT_LEVELS, "16-bit checkerboard of 0 and 65535"),
        HostileFile("1bit.png", _png((np.indices((SIDE, SIDE)).sum(axis=0) % 3 == 0)), REJECT_LEVELS,
                    "1-bit PNG"),
        HostileFile("2bit-palette.png", _png(np.tile(np.arange(SIDE, dtype=np.uint8) % 4 * 85, (SIDE, 1)),
                                             bits=2, optimize=True), REJECT_LEVELS, "2-bit PNG, 4 grey levels"),
    ]


def _broken_jpegs() -> list[HostileFile]:
    good = _other_format("JPEG")
    return [
        HostileFile("truncated.jpg", good[:len(good) // 2], REJECT_TRUNCATED, "JPEG cut in half"),
        HostileFile("soi-only.jpg", good[:3], REJECT_UNDECODABLE, "JPEG start marker only"),
        HostileFile("garbage.jpg", good[:3] + bytes(range(256)) * 4, REJECT_UNDECODABLE,
                    "JPEG start marker then garbage"),
    ]


def _dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray | None = None, photometric: str = "MONOCHROME2") -> object:
    ds = new_dicom(SecondaryCaptureImageStorage)
    ds.PatientSex = "F"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=8 if pixels.dtype == np.uint8
                          else 12)
    return ds


def _compressed_dicom(syntax) -> bytes:
    """A DICOM whose pixel data claims ``syntax`` (encapsulated, one fragment of junk)."""
    from pydicom.encaps import encapsulate

    ds = _dicom(_texture())
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])  # a codestream start, then nothing
    ds["PixelData"].VR = "OB"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    return _dicom_bytes(ds)


def _hostile_dicoms() -> list[HostileFile]:
    no_pixels = _dicom()
    no_pixels.Modality = "SR"
    multi = _dicom(np.stack([_texture(seed=k) for k in range(3)]))
    colour = _dicom(np.random.default_rng(3).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), "RGB")
    giant = _dicom(_texture())
    giant.Rows = giant.Columns = 60_000
    good = _dicom_bytes(_dicom(_texture().astype(np.uint16) * 16))
    assert no_pixels.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    return [
        HostileFile("no-pixels.dcm", _dicom_bytes(no_pixels), REJECT_DICOM, "DICOM without pixel data"),
        HostileFile("multi-frame.dcm", _dicom_bytes(multi), REJECT_DICOM, "DICOM with 3 frames"),
        HostileFile("rgb.dcm", _dicom_bytes(colour), REJECT_DICOM, "RGB DICOM"),
        HostileFile("htj2k.dcm", _compressed_dicom(HTJ2KLossless), REJECT_DICOM,
                    "DICOM in HTJ2K (JPEG 2000 High-Throughput): no installed decoder"),
        HostileFile("j2k-junk.dcm", _compressed_dicom(JPEG2000Lossless), REJECT_UNDECODABLE,
                    "DICOM in JPEG 2000 whose codestream is junk"),
        HostileFile("giant.dcm", _dicom_bytes(giant), REJECT_BOMB, "DICOM claiming 60,000 x 60,000 pixels"),
        HostileFile("truncated.dcm", good[:len(good) * 2 // 3], REJECT_UNDECODABLE, "DICOM cut short"),
        HostileFile("preamble-only.dcm", good[:132], REJECT_DICOM, "DICOM preamble and magic only"),
        HostileFile("black.dcm", _dicom_bytes(_dicom(np.zeros((SIDE, SIDE), np.uint16))), REJECT_BLANK,
                    "DICOM, all pixels 0"),
    ]

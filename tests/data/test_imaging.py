"""Decoding every image kind to a uint8 square canvas, and rejecting bad files with a reason."""

import numpy as np
import pytest

from boneage.imaging import ImageRejected, decode_grayscale, fit_to_square, load_radiograph
from images import (gradient, write_bomb_png, write_dicom, write_jpeg, write_palette, write_png, write_png16,
                    write_rgba, write_truncated_png)

SIZE = 32


def middle_row(array: np.ndarray) -> np.ndarray:
    """The image's middle row, padding removed (a 40x30 source fits as 32x24 in the canvas)."""
    return array[SIZE // 2, 4:28].astype(int)


def assert_rising_ramp(array: np.ndarray):
    assert array.shape == (SIZE, SIZE) and array.dtype == np.uint8
    row = middle_row(array)
    assert row[0] < 20 and row[-1] > 230, row
    assert (np.diff(row) >= -2).all(), row  # monotone up to resampling noise


@pytest.mark.parametrize("writer", [
    lambda p: write_png(p / "a.png", gradient().astype(np.uint8)),  # 8-bit grayscale
    lambda p: write_png16(p / "a.png"),  # 16-bit, 12 bits used: windowed to the full range
    lambda p: write_png(p / "a.png", np.stack([gradient().astype(np.uint8)] * 3, -1)),  # RGB
    lambda p: write_jpeg(p / "a.jpg"),
    lambda p: write_palette(p / "a.png", transparent_background=False),
    lambda p: write_dicom(p / "a.dcm", "MONOCHROME2", slope=2.0, intercept=-100.0),
])
def test_image_kinds_decode_to_the_same_ramp(tmp_path, writer):
    assert_rising_ramp(load_radiograph(writer(tmp_path), SIZE))


def test_dicom_monochrome1_is_inverted(tmp_path):
    row = middle_row(load_radiograph(write_dicom(tmp_path / "a.dcm", "MONOCHROME1"), SIZE))
    assert row[0] > 230 and row[-1] < 20


def framed(path, size: int) -> np.ndarray:
    """``path`` decoded and framed on a square, without the content checks that refuse flat test patterns."""
    return fit_to_square(decode_grayscale(path.read_bytes()), size)


def unpadded_row(path) -> np.ndarray:
    """The middle row of a 40x30 source decoded at its own height: no resampling, 5 columns of padding each side."""
    return framed(path, 40)[20, 5:35].astype(float)


STORED = gradient(high=4095)[0]  # the values write_dicom stores along a row


def test_dicom_window_is_in_rescaled_units(tmp_path):
    """Rescale slope and intercept come before the window (centre 4000, width 2000 of the rescaled values): read
    without the rescale, the same window would fall on other columns."""
    path = write_dicom(tmp_path / "a.dcm", slope=2.0, intercept=-100.0, window=(4000, 2000))
    expected = np.clip((2.0 * STORED - 100.0 - 3000.0) / 2000.0, 0, 1) * 255
    assert np.abs(unpadded_row(path) - expected).max() <= 3


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    """A VOI LUT that thresholds at half range turns the ramp into black then white."""
    threshold = np.where(np.arange(4096) < 2048, 0, 4095)
    row = unpadded_row(write_dicom(tmp_path / "a.dcm", voi_lut=threshold))
    assert np.array_equal(row, np.where(STORED < 2048, 0, 255))


@pytest.mark.parametrize("writer", [write_rgba, lambda p: write_palette(p, transparent_background=True)])
def test_transparent_pixels_become_black_background(tmp_path, writer):
    # The transparent strip is the first 5 of 30 columns: white in the palette, but background.
    row = middle_row(load_radiograph(writer(tmp_path / "a.png"), SIZE))
    assert (row[:3] == 0).all()
    assert row[-1] > 230


def test_resize_keeps_aspect_ratio_and_pads_with_black(tmp_path):
    tall = np.full((200, 100), 255, dtype=np.uint8)
    out = framed(write_png(tmp_path / "tall.png", tall), 64)
    assert out.shape == (64, 64)
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()  # padding left and right
    assert (out[:, 17:47] == 255).all()  # the image, 32 px wide, full height: not squashed
    wide = framed(write_png(tmp_path / "wide.png", tall.T.copy()), 64)
    assert (wide[:16] == 0).all() and (wide[17:47] == 255).all()


def test_upscaling_small_images(tmp_path):
    out = framed(write_png(tmp_path / "s.png", np.full((10, 10), 77, np.uint8)), SIZE)
    assert (out == 77).all()


@pytest.mark.parametrize("writer, code", [
    (write_truncated_png, "truncated_image"),
    (write_bomb_png, "decompression_bomb"),
    (lambda p: p.write_bytes(b"this is not an image") and p, "not_an_image"),
    (lambda p: p.write_bytes(b"") or p, "undecodable_image"),
])
def test_bad_files_are_rejected_with_a_reason(tmp_path, writer, code):
    path = writer(tmp_path / "bad.png")
    with pytest.raises(ImageRejected) as err:
        load_radiograph(path, SIZE)
    assert err.value.code == code
    assert err.value.reason.startswith(code + ": ")


def test_bomb_limit_is_configurable(tmp_path):
    path = write_png(tmp_path / "big.png", np.random.default_rng(0).integers(0, 256, (1000, 1000), np.uint8))  # 1 MP
    assert load_radiograph(path, SIZE, max_megapixels=2.0).shape == (SIZE, SIZE)
    with pytest.raises(ImageRejected, match="decompression_bomb.*exceeds the limit of 0.5"):
        load_radiograph(path, SIZE, max_megapixels=0.5)


def test_dicom_claiming_a_huge_image_is_rejected_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", rows=60_000, columns=60_000)
    with pytest.raises(ImageRejected) as err:
        load_radiograph(path, SIZE)
    assert err.value.code == "decompression_bomb"


def test_truncated_dicom_is_rejected(tmp_path):
    path = write_dicom(tmp_path / "a.dcm")
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ImageRejected):
        load_radiograph(path, SIZE)


def test_dicom_with_a_window_that_is_no_number_is_rejected(tmp_path):
    data = write_dicom(tmp_path / "a.dcm", window=(1234, 3000)).read_bytes()
    assert data.count(b"1234") == 1
    (tmp_path / "a.dcm").write_bytes(data.replace(b"1234", b"ab.x"))  # Window Center: a DS that is no number
    with pytest.raises(ImageRejected, match="undecodable_image: DICOM TypeError"):
        load_radiograph(tmp_path / "a.dcm", SIZE)

"""The phantom generator: RSNA-like labels, age signal only in anatomy, deterministic, readable by the loader."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from boneage.config import load_config
from boneage.phantoms import maturity as mat
from boneage.phantoms.anatomy import DIGITS, build_hand
from boneage.phantoms.generate import generate_phantoms, make_phantom, sample_subject
from boneage.rsna import read_labels
from helpers import ROOT, phantom_config


def test_labels_follow_the_rsna_distribution_with_known_rater_noise():
    rng = np.random.default_rng(0)
    draws = pd.DataFrame([sample_subject(rng, 6.0) for _ in range(20_000)], columns=["maturity", "male", "label"])
    assert draws["maturity"].between(1, 228).all()
    assert draws["label"].mean() == pytest.approx(127, abs=2)
    assert draws["label"].std() == pytest.approx(41, abs=3)
    assert draws["male"].mean() == pytest.approx(0.54, abs=0.015)
    noise = draws["label"] - draws["maturity"]
    assert noise.std() == pytest.approx(6.0, abs=0.2)
    assert noise.abs().mean() == pytest.approx(6.0 * np.sqrt(2 / np.pi), abs=0.15)  # the best possible MAE


def test_ossification_follows_the_reference_order_and_girls_mature_earlier():
    present = [name for name in mat.CARPAL_TIMING if mat.carpal_size(30, True, name) > 0]
    assert present == ["capitate", "hamate", "triquetrum"]  # boys at 2.5 years
    assert all(mat.carpal_size(200, True, n) == 1.0 for n in mat.CARPAL_TIMING)  # all grown by adolescence
    assert mat.carpal_size(1, True, "capitate") == 0.0
    # At 12 years a girl's pisiform has appeared, a boy's has not.
    assert mat.carpal_size(144, False, "pisiform") > 0 and mat.carpal_size(120, True, "pisiform") == 0
    radius = mat.RADIUS_TIMING
    assert not mat.epiphysis_state(11, True, radius).present and mat.epiphysis_state(11, False, radius).present
    distal = mat.hand_epiphysis_timing("middle", "distal")
    assert mat.epiphysis_state(170, False, distal).fused and not mat.epiphysis_state(170, True, distal).fused
    assert mat.epiphysis_state(228, True, radius).fused


def test_epiphyses_widen_then_their_growth_plates_close():
    timing = mat.hand_epiphysis_timing("index", "proximal")
    ages = np.arange(0, 229, 6)
    states = [mat.epiphysis_state(a, True, timing) for a in ages]
    widths = [s.width for s in states if s.present]
    gaps = [s.gap for s in states if s.present]
    assert np.all(np.diff(widths) >= 0) and widths[0] < 0.5 and widths[-1] > 1.0  # capping the shaft
    assert np.all(np.diff(gaps) <= 0) and gaps[0] == 1.0 and gaps[-1] == 0.0
    appear = {(d.name, bone): mat.hand_epiphysis_timing(d.name, bone).appear for d in DIGITS for bone, *_ in d.bones}
    assert max(appear, key=lambda k: appear[k][0]) == ("little", "middle")  # the fifth middle phalanx is last
    assert min(appear, key=lambda k: appear[k][0])[0] == "middle"  # the middle finger first


def test_pose_randomness_does_not_change_the_anatomy():
    # The rng only moves fingers: which centres exist and their sizes depend on age and sex alone.
    first = build_hand(100, True, np.random.default_rng(1))
    second = build_hand(100, True, np.random.default_rng(2))
    assert [b.name for b in first.bones] == [b.name for b in second.bones]
    carpals = lambda hand: [(b.parts[0].a, b.parts[0].b) for b in hand.bones if b.name.startswith("carpal")]
    assert carpals(first) == carpals(second)
    assert len(build_hand(200, True, np.random.default_rng(1)).bones) > len(first.bones) > len(
        build_hand(6, True, np.random.default_rng(1)).bones)


def test_phantoms_are_deterministic_per_seed():
    a, b, c = make_phantom(7, 3, 64, 6.0), make_phantom(7, 3, 64, 6.0), make_phantom(7, 4, 64, 6.0)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes and a.label == b.label
    assert not np.array_equal(a.image, c.image)


def test_structure_boxes_lie_on_bright_bone():
    for index in range(5):
        ph = make_phantom(index, 0, 128, 6.0)
        height, width = ph.image.shape
        assert ph.boxes, "every hand has age-bearing structures"
        inside = []
        for name, x0, y0, x1, y1 in ph.boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, name
            inside.append(ph.image[y0:y1, x0:x1].mean())
        assert np.mean(inside) > ph.image.mean() + 20


def test_generated_set_is_in_the_kaggle_layout_and_independent_of_worker_count(tmp_path):
    serial = generate_phantoms(load_config(overrides=[
        f"phantoms.out={tmp_path / 'one'}", "phantoms.n=12", "phantoms.size=64", "phantoms.workers=1"]))
    parallel = generate_phantoms(load_config(overrides=[
        f"phantoms.out={tmp_path / 'two'}", "phantoms.n=12", "phantoms.size=64", "phantoms.workers=2"]))
    for name in ["boneage-training-dataset.csv", "truth.csv", "boxes.csv"]:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes()
    pngs = sorted(serial.rglob("*.png"))
    assert len(pngs) == 12 and all(p.read_bytes() == (parallel / p.relative_to(serial)).read_bytes() for p in pngs)
    assert pngs[0].parent == serial / "boneage-training-dataset" / "boneage-training-dataset"
    loaded = read_labels(serial / "boneage-training-dataset.csv", serial)
    assert loaded.format.name == "kaggle-train" and loaded.rejects.empty and len(loaded.table) == 12
    assert json.loads((serial / "phantoms.json").read_text())["settings"]["seed"] == 0


def test_the_best_possible_mae_is_the_rater_noise(phantom_dir):
    """The summary's best possible MAE is the mean rater error |label - true age| of the set's 60 phantoms: the
    noise model's sd * sqrt(2/pi) = 4.8 months for sd 6, give or take 4 standard errors of a mean of 60
    half-normal draws (sd * sqrt(1 - 2/pi) / sqrt(60) = 0.47 month each)."""
    summary = json.loads((phantom_dir / "phantoms.json").read_text())
    truth = pd.read_csv(phantom_dir / "truth.csv")
    best, sd, n = summary["best_possible_mae_months"], summary["settings"]["label_noise_sd"], len(truth)
    assert n == 60 and best == pytest.approx((truth["boneage"] - truth["maturity_months"]).abs().mean(), abs=0.01)
    assert best == pytest.approx(sd * np.sqrt(2 / np.pi), abs=4 * sd * np.sqrt(1 - 2 / np.pi) / np.sqrt(n))


def test_make_phantoms_command_line_and_reuse(tmp_path):
    args = [sys.executable, "jobs/make_phantoms.py", "--out", str(tmp_path / "p"), "--n", "5", "--seed", "1",
            "--size", "64"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert len(list((tmp_path / "p").rglob("*.png"))) == 5
    stamp = (tmp_path / "p" / "phantoms.json").stat().st_mtime_ns
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "up to date" in second.stdout
    assert (tmp_path / "p" / "phantoms.json").stat().st_mtime_ns == stamp


def test_dicom_copies_carry_sex_and_age_and_read_back_as_the_png(phantom_dir, tmp_path):
    import pydicom

    from boneage.imaging import load_radiograph

    cfg = phantom_config(phantom_dir, "phantoms.dicom_examples=2", f"phantoms.dicom_out={tmp_path / 'dicom'}")
    generate_phantoms(cfg)  # the set is up to date: only the DICOM copies are written
    labels = pd.read_csv(phantom_dir / "boneage-training-dataset.csv", dtype={"id": str}).set_index("id")
    examples = sorted((tmp_path / "dicom").glob("*.dcm"))
    assert [p.stem for p in examples] == list(labels.index[:2])
    for path in examples:
        ds = pydicom.dcmread(path)
        row = labels.loc[path.stem]
        assert ds.PatientSex == ("M" if row["male"] else "F") and ds.PhotometricInterpretation == "MONOCHROME1"
        assert ds.PatientAge == f"{int(row['boneage']) // 12:03d}Y"
        png = next(phantom_dir.rglob(f"{path.stem}.png"))
        from_dicom, from_png = load_radiograph(path, 64), load_radiograph(png, 64)
        # min-max windowing may stretch the contrast, but it is the same picture
        assert np.corrcoef(from_dicom.ravel(), from_png.ravel())[0, 1] > 0.99

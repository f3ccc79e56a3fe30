"""Bulk scoring (boneage.scoring, jobs/predict.py) with real Ray Data actors on tiny images: every input layout,
sex from labels or DICOM headers, every reject with its reason, the mismatches refused before any work, and answers
equal to the service's for the same files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from boneage.config import load_config
from boneage.scoring import ScoringInputError, load_canvases, score, write_predictions
from helpers import make_bundle, synthetic_trust
from images import gradient, write_dicom, write_truncated_png

SIZE = 32


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle with trust signals: bias-corrected answers with intervals, as every exported bundle has."""
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b", size=SIZE, trust=synthetic_trust())[0]


@pytest.fixture(scope="module")
def untrusted_bundle(tmp_path_factory) -> Path:
    """A bundle without trust signals, as written before bundle format 2."""
    return make_bundle(tmp_path_factory.mktemp("untrusted") / "b", size=SIZE)[0]


@pytest.fixture
def hands(phantom_dir, tmp_path) -> tuple[Path, pd.DataFrame]:
    """Six phantom PNGs in a folder of their own, and their labels (id, boneage, male)."""
    labels = pd.read_csv(phantom_dir / "boneage-training-dataset.csv", dtype={"id": str}).head(6)
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id in labels["id"]:
        shutil.copy(next(phantom_dir.rglob(f"{image_id}.png")), folder)
    return folder, labels


def settings(*overrides: str):
    return load_config(overrides=["predict.batch_size=4", "predict.actors=1", *overrides]).predict


def scored_with(bundle: Path, *overrides: str):
    return score(settings(f"predict.bundle={bundle}", *overrides), registry_root="unused")


def reasons(scored) -> dict[str, str]:
    return dict(zip(scored.rejects["id"], scored.rejects["reason"].str.split(":").str[0]))


def sex_letters(male: pd.Series) -> list[str]:
    return ["M" if m else "F" for m in male]


def write_layout(labels: pd.DataFrame, layout: str, path: Path) -> Path:
    """The same labels in one of the RSNA layouts."""
    sex = sex_letters(labels["male"])
    table = {"kaggle-train": pd.DataFrame({"id": labels["id"], "boneage": labels["boneage"],
                                           "male": labels["male"]}),
             "rsna-validation": pd.DataFrame({"Image ID": labels["id"], "male": labels["male"],
                                              "Bone Age (months)": labels["boneage"]}),
             "rsna-test": pd.DataFrame({"Case ID": labels["id"], "Sex": sex,
                                        "Ground truth bone age (months)": labels["boneage"]}),
             "kaggle-test": pd.DataFrame({"Case ID": labels["id"], "Sex": sex})}[layout]
    if path.suffix == ".xlsx":
        table.to_excel(path, index=False)
    else:
        table.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("layout, name", [("kaggle-train", "train.csv"), ("rsna-validation", "val.csv"),
                                          ("rsna-test", "truth.xlsx"), ("kaggle-test", "test.csv")])
def test_every_labels_layout_is_scored_in_input_order(layout, name, hands, bundle, ray_session, tmp_path):
    folder, labels = hands
    labels_file = write_layout(labels, layout, tmp_path / name)
    scored = scored_with(bundle, f"predict.labels={labels_file}", f"predict.images={folder}")
    predictions = scored.predictions
    assert list(predictions["id"]) == list(labels["id"]) and scored.rejects.empty
    assert list(predictions["sex"]) == sex_letters(labels["male"])
    assert predictions["bone_age_months"].between(0, 400).all()
    if layout == "kaggle-test":  # no ages in this layout
        assert predictions["boneage"].isna().all()
    else:
        assert np.allclose(predictions["boneage"], labels["boneage"])
    assert scored.source.labels == str(labels_file) and scored.source.image_size == SIZE
    assert scored.training_mean_months == 120.0 and len(scored.bundle_sha256) == 64


def test_sex_comes_from_the_labels_or_the_dicom_header_and_is_never_guessed(hands, bundle, ray_session, tmp_path):
    folder, labels = hands
    write_dicom(folder / "dicom-f.dcm")  # PatientSex F
    anonymous = write_dicom(folder / "dicom-none.dcm")
    header = pydicom.dcmread(anonymous)
    del header.PatientSex
    header.save_as(anonymous)
    rows = pd.DataFrame({"id": [*labels["id"], "dicom-f", "dicom-none"], "boneage": 100.0,
                         "male": ["True", "", *["False"] * (len(labels) - 2), "", ""]})
    rows.to_csv(tmp_path / "labels.csv", index=False)
    scored = scored_with(bundle, f"predict.labels={tmp_path / 'labels.csv'}", f"predict.images={folder}")
    assert reasons(scored) == {labels["id"][1]: "missing_sex", "dicom-none": "missing_sex"}  # a PNG has no header
    sex = dict(zip(scored.predictions["id"], scored.predictions["sex"]))
    assert sex["dicom-f"] == "F" and sex[labels["id"][0]] == "M" and sex[labels["id"][2]] == "F"

    unlabeled = scored_with(bundle, f"predict.images={folder}")  # no labels file: every image, sex from headers
    assert list(unlabeled.predictions["id"]) == ["dicom-f"] and unlabeled.predictions["boneage"].isna().all()
    assert reasons(unlabeled) == {**{i: "missing_sex" for i in labels["id"]}, "dicom-none": "missing_sex"}


def test_every_row_left_out_is_a_reject_with_its_reason(hands, bundle, ray_session, tmp_path):
    folder, labels = hands
    ids = list(labels["id"])
    write_truncated_png(folder / "broken.png")
    rows = pd.DataFrame({"id": [*ids[:4], "broken", "absent", ids[0]], "boneage": 90.0,
                         "male": ["True", "True", "maybe", "False", "True", "True", "True"]})
    rows.loc[1, "boneage"] = 999.0
    rows.to_csv(tmp_path / "labels.csv", index=False)
    scored = scored_with(bundle, f"predict.labels={tmp_path / 'labels.csv'}", f"predict.images={folder}")
    assert reasons(scored) == {ids[0]: "duplicate_id", ids[1]: "bad_boneage", ids[2]: "bad_sex",
                               "broken": "truncated_image", "absent": "missing_image", ids[4]: "image_without_label",
                               ids[5]: "image_without_label"}
    assert list(scored.predictions["id"]) == [ids[3]]

    out, rejects = write_predictions(scored, tmp_path / "out" / "scores.csv")
    assert rejects == tmp_path / "out" / "scores.rejects.csv"
    assert list(pd.read_csv(out).columns) == ["id", "sex", "bone_age_months", "interval_low", "interval_high",
                                             "bone_age_months_raw", "boneage"]
    assert len(pd.read_csv(rejects)) == 8 and sorted(p.name for p in out.parent.iterdir()) == [
        "scores.csv", "scores.rejects.csv"]  # no temporary files left


def test_a_prepared_split_is_scored_from_its_parquet(prepared_dir, bundle, ray_session, tmp_path):
    scored = scored_with(bundle, f"predict.data={prepared_dir}", "predict.split=test")
    test = pd.read_parquet(prepared_dir / "split=test")
    assert list(scored.predictions["id"]) == list(test["id"]) and scored.rejects.empty
    assert np.allclose(scored.predictions["boneage"], test["boneage"])
    assert list(scored.predictions["sex"]) == sex_letters(test["male"])
    assert scored.source.split == "test" and len(scored.source.fingerprint) == 64
    ids = list(test["id"][:3])[::-1]
    expected = np.stack([np.frombuffer(test.set_index("id")["image"][i], np.uint8).reshape(SIZE, SIZE) for i in ids])
    assert np.array_equal(load_canvases(scored.source, ids), expected)
    out, _ = write_predictions(scored, tmp_path / "p.csv")
    assert "boneage" in pd.read_csv(out).columns


@pytest.mark.parametrize("overrides, words", [
    (["predict.split=holdout"], ["predict.split='holdout'", "test", "train", "val"]),
    (["predict.split=test", "bundle_size=64"], ["prepared at 32 px", "takes 64 px"]),
    (["labels_elsewhere"], ["matches no images", "none of its 6 ids"]),
])
def test_inputs_that_do_not_fit_fail_in_one_line_before_any_work(overrides, words, prepared_dir, hands, bundle,
                                                                 tmp_path):
    folder, labels = hands
    model = make_bundle(tmp_path / "b64", size=64)[0] if "bundle_size=64" in overrides else bundle
    if "labels_elsewhere" in overrides:
        empty = tmp_path / "elsewhere"
        empty.mkdir()
        Image.fromarray(gradient().astype(np.uint8)).save(empty / "someone-else.png")
        inputs = [f"predict.labels={write_layout(labels, 'kaggle-train', tmp_path / 'l.csv')}",
                  f"predict.images={empty}"]
    else:
        inputs = [f"predict.data={prepared_dir}", *[o for o in overrides if o.startswith("predict.")]]
    with pytest.raises(ScoringInputError) as err:  # no ray_session: it fails before connecting to Ray
        score(settings(f"predict.bundle={model}", *inputs), registry_root="unused")
    message = str(err.value)
    assert "\n" not in message and all(word in message for word in words), message


def write_service_cases(folder: Path) -> dict[str, str]:
    """A PNG, a JPEG big enough that decoding it at a reduced scale (its draft) depends on the canvas size, and a
    DICOM file; with the sex each is scored with."""
    noise = np.random.default_rng(0).integers(0, 60, (480, 600))
    pixels = np.clip(np.tile(np.linspace(0, 190, 600), (480, 1)) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "jpeg.jpg", quality=90)
    Image.fromarray(pixels[::3, ::2]).save(folder / "png.png")
    write_dicom(folder / "dicom.dcm")
    return {"jpeg": "M", "png": "F", "dicom": "F"}


def test_answers_equal_the_services_for_png_jpeg_and_dicom(bundle, ray_session, tmp_path):
    from boneage.bundle import load_bundle
    from boneage.inference import BoneAgePredictor

    folder = tmp_path / "files"
    folder.mkdir()
    cases = write_service_cases(folder)
    pd.DataFrame({"Case ID": list(cases), "Sex": list(cases.values())}).to_csv(tmp_path / "l.csv", index=False)
    scored = scored_with(bundle, f"predict.labels={tmp_path / 'l.csv'}", f"predict.images={folder}",
                         "predict.batch_size=2", "predict.actors=2")  # two batches on two actors
    answers = dict(zip(scored.predictions["id"], scored.predictions["bone_age_months"]))

    service = BoneAgePredictor(load_bundle(bundle))  # the service's defaults: overlay 384 px, precision auto
    files = {image_id: next(folder.glob(f"{image_id}.*")) for image_id in cases}
    radiographs = {image_id: service.decode(path.read_bytes()) for image_id, path in files.items()}
    expected = {image_id: float(service.predict(r.canvas[None], np.array([cases[image_id] == "M"]))[0])
                for image_id, r in radiographs.items()}
    assert answers == expected and service.calibrated  # bias-corrected, as the service answers
    for row in scored.predictions.itertuples():
        low, high = service.interval(np.array([row.bone_age_months]), np.array([row.sex == "M"]))
        assert (row.interval_low, row.interval_high) == (low[0], high[0]) and low[0] < row.bone_age_months < high[0]
        raw = service.predict_raw(radiographs[row.id].canvas[None], np.array([row.sex == "M"]))[0]
        assert row.bone_age_months_raw == raw != row.bone_age_months
    canvases = load_canvases(scored.source, list(cases))
    assert all(np.array_equal(c, radiographs[i].canvas) for c, i in zip(canvases, cases))


@pytest.mark.parametrize("trusted, columns", [
    (True, ["id", "sex", "bone_age_months", "interval_low", "interval_high", "bone_age_months_raw"]),
    (False, ["id", "sex", "bone_age_months"])], ids=["with trust signals", "without"])
def test_the_job_writes_predictions_and_names_them_last(trusted, columns, hands, bundle, untrusted_bundle,
                                                        ray_session, tmp_path, capsys):
    import runpy

    from helpers import ROOT

    bundle = bundle if trusted else untrusted_bundle
    folder, labels = hands
    labels_file = write_layout(labels, "kaggle-test", tmp_path / "test.csv")
    main = runpy.run_path(str(ROOT / "jobs" / "predict.py"), run_name="imported")["main"]
    main(["--set", f"predict.bundle={bundle}", f"predict.labels={labels_file}", f"predict.images={folder}",
          f"predict.out={tmp_path / 'p.csv'}", "predict.batch_size=4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"predictions: {tmp_path / 'p.csv'}"
    assert any(line.startswith("scored 6 images (0 with a true age)") for line in lines)
    written = pd.read_csv(tmp_path / "p.csv", dtype={"id": str})
    assert list(written.columns) == columns and list(written["id"]) == list(labels["id"])
    assert (tmp_path / "p.rejects.csv").is_file()


def test_trust_signals_are_fitted_on_the_same_raw_answers_on_actors_or_here(prepared_dir, bundle, ray_session):
    from boneage.signals import raw_answers_here, raw_answers_on_gpus

    here = raw_answers_here(bundle, str(prepared_dir), "val")
    on_actors = raw_answers_on_gpus(bundle, str(prepared_dir), "val", use_gpu=False)  # the GPU path, on CPUs here
    assert len(here) > 0 and list(on_actors["id"]) == list(here["id"])
    assert np.allclose(on_actors["raw_months"], here["raw_months"])  # raw: the bundle's correction is not applied
    assert list(on_actors["male"]) == list(here["male"]) and np.allclose(on_actors["boneage"], here["boneage"])


def test_trust_signals_are_fitted_in_a_process_without_ray(prepared_dir, bundle):
    """Re-exporting a finished run's bundle happens before (without) connecting to Ray: no cluster to ask."""
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import sys; from boneage.signals import fit_trust_signals; import ray; "
            "signals = fit_trust_signals(sys.argv[1], sys.argv[2]); "
            "assert not ray.is_initialized(); print(sum(signals.intervals.counts().values()))")
    done = subprocess.run([sys.executable, "-c", code, str(bundle), str(prepared_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == len(pd.read_parquet(prepared_dir / "split=val"))

"""No patient identifier and no image bytes in anything the platform writes or logs.

A DICOM file carrying a value for every identifying attribute of ``boneage.deid`` (a name, an ID, a birth date, an
accession number, an institution, UIDs, ...), a private element and a run of marked raw pixels, two broken copies
of it (pixel data cut short; the file ending after the patient's name) and a few phantom PNGs go through the prepare
job, the predict job and the evaluate job. Every file they write (Parquet decoded too, PNGs with their text chunks),
the captured logs and output, and the Ray workers' log files are searched for those values."""

from __future__ import annotations

import logging
import runpy
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest

from boneage.dataset import REJECTS
from boneage.deid import IDENTIFYING_KEYWORDS, READ_TAGS, read_dicom
from boneage.prepare import prepare_dataset
from helpers import ROOT, data_config, make_bundle, synthetic_trust
from images import leaked, leaks_in_files, logged, write_identified_dicom

SIZE = 32
IDENTIFIED, CUT_PIXELS, CUT_HEADER = "identified", "cut-pixels", "cut-header"
PHANTOMS = 6


def write_cases(phantom_dir: Path, folder: Path) -> pd.DataFrame:
    """The identified DICOM, its broken copies and phantom PNGs in ``folder``; their labels (id, boneage, male)."""
    folder.mkdir()
    labels = pd.read_csv(phantom_dir / "boneage-training-dataset.csv", dtype={"id": str}).head(PHANTOMS)
    for image_id in labels["id"]:
        shutil.copy(next(phantom_dir.rglob(f"{image_id}.png")), folder)
    write_identified_dicom(folder / f"{IDENTIFIED}.dcm")
    write_identified_dicom(folder / f"{CUT_PIXELS}.dcm", broken="pixels")
    write_identified_dicom(folder / f"{CUT_HEADER}.dcm", broken="header")
    dicoms = pd.DataFrame({"id": [IDENTIFIED, CUT_PIXELS, CUT_HEADER], "boneage": 100.0, "male": False})
    return pd.concat([labels[["id", "boneage", "male"]], dicoms], ignore_index=True)


@pytest.fixture
def cases(phantom_dir, tmp_path) -> tuple[Path, pd.DataFrame]:
    """The image folder of :func:`write_cases` and its labels."""
    return tmp_path / "images", write_cases(phantom_dir, tmp_path / "images")


def test_the_reader_keeps_the_allow_list_alone(tmp_path):
    path = write_identified_dicom(tmp_path / "a.dcm")
    assert all(keyword in pydicom.dcmread(path) for keyword in IDENTIFYING_KEYWORDS)  # the file carries them all
    assert not set(READ_TAGS) & set(IDENTIFYING_KEYWORDS)
    ds = read_dicom(path.read_bytes())
    assert {element.keyword for element in ds} <= set(READ_TAGS) and ds.PatientSex == "F"
    assert [element.keyword for element in ds.file_meta] == ["TransferSyntaxUID"]
    assert not leaked(str(ds) + str(ds.file_meta))


def test_no_other_code_parses_dicom():
    readers = [path.relative_to(ROOT) for folder in ("platform", "jobs", "serve", "bench")
               for path in (ROOT / folder).rglob("*.py") if "dcmread" in path.read_text()]
    assert readers == [Path("platform/boneage/deid.py")]


def test_prepare_writes_and_logs_no_identifier(cases, ray_session, ray_logs, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    images, labels = cases
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "prepared" / "set"
    prepare_dataset(data_config(tmp_path / "labels.csv", images, out, "data.max_reject_fraction=0.5"))

    kept = set(pq.read_table(out, columns=["id"])["id"].to_pylist())
    assert kept == set(labels["id"]) - {CUT_PIXELS, CUT_HEADER}  # the identified file is decoded, not dropped
    rejects = pd.read_csv(out / REJECTS).set_index("id")["reason"]
    assert set(rejects.index) == {CUT_PIXELS, CUT_HEADER}
    assert rejects[CUT_PIXELS].startswith("undecodable_image: DICOM ValueError: The number of bytes of pixel data")
    assert leaks_in_files(out.parent, ray_logs) == {} and leaked(logged(caplog, capfd)) == []


def job(name: str, *overrides: str) -> None:
    """jobs/<name>.py's main with ``--set overrides``, in this process."""
    main = runpy.run_path(str(ROOT / "jobs" / f"{name}.py"), run_name="imported")["main"]
    main(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--set", *overrides])


def test_predict_and_evaluate_write_and_log_no_identifier(cases, ray_session, ray_logs, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    images, labels = cases
    bundle = make_bundle(tmp_path / "bundle", size=SIZE, trust=synthetic_trust())[0]
    sex = ["M" if male else "F" for male in labels["male"]]
    sex[list(labels["id"]).index(IDENTIFIED)] = ""  # its sex comes from its DICOM header
    pd.DataFrame({"Case ID": labels["id"], "Sex": sex, "Ground truth bone age (months)": labels["boneage"]}).to_csv(
        tmp_path / "labels.csv", index=False)
    given = [f"labels={tmp_path / 'labels.csv'}", f"images={images}", f"bundle={bundle}", "batch_size=4", "actors=1"]
    job("predict", *(f"predict.{g}" for g in given), f"predict.out={tmp_path / 'predicted' / 'p.csv'}")
    job("evaluate", *(f"eval.{g}" for g in given), "eval.data=", f"eval.out={tmp_path / 'evaluated'}",
        "eval.gallery_cases=1", "eval.bootstrap_resamples=20")

    predictions = pd.read_csv(tmp_path / "predicted" / "p.csv").set_index("id")
    assert predictions.loc[IDENTIFIED, "sex"] == "F" and len(predictions) == PHANTOMS + 1
    rejects = pd.read_csv(tmp_path / "predicted" / "p.rejects.csv").set_index("id")["reason"]
    assert set(rejects.index) == {CUT_PIXELS, CUT_HEADER}
    assert leaks_in_files(tmp_path / "predicted", tmp_path / "evaluated", ray_logs) == {}
    assert leaked(logged(caplog, capfd)) == []

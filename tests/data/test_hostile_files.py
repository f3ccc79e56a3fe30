"""Issue 16's hostile corpus (:mod:`boneage.phantoms.hostile`) through the prepare job: every file is reported in
rejects.csv with its reason code, the good rows are prepared, and nothing is written outside the output folder,
whatever the labels and file names say."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from boneage.dataset import REJECTS, read_manifest
from boneage.imaging import REJECT_NOT_IMAGE, REJECT_UNDECODABLE, load_radiograph
from boneage.phantoms.hostile import EMPTY_FILE, hostile_files
from boneage.prepare import prepare_dataset
from boneage.rsna import REJECT_MISSING_IMAGE
from helpers import data_config

pytestmark = pytest.mark.usefixtures("ray_session")

UNICODE_ID = "händ-Ω-𝟙"


def snapshot(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def add_hostile_rows(source: Path) -> dict[str, str]:
    """Write every hostile file under ``source/hostile`` with a labels row, plus a row whose id climbs out of the
    image folder and a file with a unicode name; the reason code each row must be rejected with, by id."""
    labels = source / "boneage-training-dataset.csv"
    table = pd.read_csv(labels, dtype=str)
    folder = source / "hostile"
    folder.mkdir()
    expected = {}
    for index, case in enumerate(hostile_files()):
        image_id = f"9{index:03d}"
        (folder / f"{image_id}{Path(case.name).suffix}").write_bytes(case.data)
        expected[image_id] = REJECT_UNDECODABLE if case.code == EMPTY_FILE else case.code  # prepare: no 400
    shutil.copy(next(source.rglob("*.png")), source.parent / "outside.png")  # a real hand, outside the folder
    expected["../outside"] = REJECT_MISSING_IMAGE  # only files under data.images are ever read
    (folder / f"{UNICODE_ID}.png").write_bytes(b"<html>not a radiograph</html>")
    expected[UNICODE_ID] = REJECT_NOT_IMAGE
    rows = pd.DataFrame({"id": list(expected), "boneage": "120", "male": "True"})
    pd.concat([table, rows], ignore_index=True).to_csv(labels, index=False)
    return expected


def test_the_prepare_job_rejects_every_hostile_file_with_its_reason_and_writes_only_its_output(phantom_dir,
                                                                                                 tmp_path):
    source = tmp_path / "src"
    shutil.copytree(phantom_dir, source)
    expected = add_hostile_rows(source)
    assert len(expected) >= 40
    before = snapshot(tmp_path)
    out = tmp_path / "prepared"
    prepare_dataset(data_config(source / "boneage-training-dataset.csv", source, out,
                                "data.max_reject_fraction=0.6"))
    rejects = pd.read_csv(out / REJECTS, dtype=str, keep_default_na=False)
    found = dict(zip(rejects["id"], rejects["reason"].str.split(":").str[0]))
    assert found == expected
    assert rejects["reason"].str.len().max() < 400  # reasons are sentences, never the file's bytes
    assert sum(read_manifest(out)["splits"]["counts"].values()) == 60  # every phantom prepared
    written = snapshot(tmp_path) - before
    assert written and all(path.is_relative_to(out) for path in written), sorted(written - snapshot(out))


def test_every_case_is_refused_by_the_decoder_itself():
    """The reader every job shares refuses each case with its code (the service maps the empty file to 400)."""
    from boneage.imaging import ImageRejected

    for case in hostile_files():
        with pytest.raises(ImageRejected) as refused:
            load_radiograph(case.data, 32)
        expected = REJECT_UNDECODABLE if case.code == EMPTY_FILE else case.code
        assert refused.value.code == expected, (case.name, refused.value.reason)

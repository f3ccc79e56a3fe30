"""User mistakes walked through the real entry points (``python jobs/<job>.py ...``): each is answered with one line
on stderr saying what to do, never a traceback. Mistakes in the command line or config exit 2, mistakes found by
the job (a missing file, a stopped service, data not prepared) exit 1; both are caught before any work starts.

RAY_ADDRESS points at a port where nothing listens, so a job that started or joined Ray before refusing would fail
differently (and with a traceback)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from boneage.bundle import BundleError
from boneage.service import build
from helpers import ROOT, free_port, make_bundle


@dataclass(frozen=True)
class Mistake:
    """A command line (``{tmp}``, ``{dead}`` and ``{wrong}`` filled in per test) and how it must be answered."""

    argv: str
    exit_code: int
    says: tuple[str, ...]  # what the one line must contain: the key or file, and what to do


MISTAKES = {
    "query: the radiograph does not exist": Mistake(
        "query.py --file {tmp}/hand.png --sex F --url {dead}", 1,
        ("radiograph {tmp}/hand.png does not exist", "PNG, JPEG or DICOM")),
    "query: the service is stopped": Mistake(
        "query.py --file {tmp}/labels.csv --sex F --url {dead}", 1,
        ("nothing answers at {dead}", "start the service", "--url")),
    "query: another server answers at the address": Mistake(
        "query.py --file {tmp}/labels.csv --sex F --url {wrong}", 1,
        ("{wrong}/v1/predict answered 501 with text/html", "not the bone-age service", "--url")),
    "query: the address is not a URL": Mistake(
        "query.py --file {tmp}/labels.csv --sex F --url localhost-8000", 1,
        ("'localhost-8000' is not a service address", "http://127.0.0.1:8000", "--url")),
    "query: the config file does not exist": Mistake(
        "query.py --config {tmp}/query.yaml --file {tmp}/labels.csv", 2,
        ("config file {tmp}/query.yaml does not exist",)),
    "prepare: the labels file does not exist": Mistake(
        "prepare.py --set data.labels={tmp}/missing.csv data.images={tmp}/images data.out={tmp}/prepared", 1,
        ("labels file {tmp}/missing.csv does not exist", "data.labels")),
    "prepare: the image folder does not exist": Mistake(
        "prepare.py --set data.labels={tmp}/labels.csv data.images={tmp}/missing data.out={tmp}/prepared", 1,
        ("image folder {tmp}/missing does not exist", "data.images")),
    "prepare: the image size is not a multiple of 32": Mistake(
        "prepare.py --set data.labels={tmp}/labels.csv data.images={tmp}/images data.out={tmp}/prepared "
        "data.image_size=100", 2,
        ("data.image_size=100 must be a multiple of 32", "use 96 or 128")),
    "train: the config file does not exist": Mistake(
        "train.py --config {tmp}/train.yaml", 2, ("config file {tmp}/train.yaml does not exist",)),
    "train: the data is not prepared": Mistake(
        "train.py --set data.out={tmp}/prepared", 1,
        ("data.out={tmp}/prepared is not a prepared dataset", "run jobs/prepare.py")),
    "train: the image size is not a multiple of 32": Mistake(
        "train.py --set data.out={tmp}/prepared data.image_size=200", 2,
        ("data.image_size=200 must be a multiple of 32", "use 192 or 224")),
    "tune: the data is not prepared": Mistake(
        "tune.py --set data.out={tmp}/prepared", 1,
        ("data.out={tmp}/prepared is not a prepared dataset", "run jobs/prepare.py")),
    "preview_augment: the data is not prepared": Mistake(
        "preview_augment.py --set data.out={tmp}/prepared --out {tmp}/preview.png", 1,
        ("data.out={tmp}/prepared is not a prepared dataset", "run jobs/prepare.py")),
    "make_phantoms: the config file does not exist": Mistake(
        "make_phantoms.py --config {tmp}/phantoms.yaml --out {tmp}/phantoms", 2,
        ("config file {tmp}/phantoms.yaml does not exist",)),
    "make_phantoms: an unknown flag": Mistake(
        "make_phantoms.py --count 5", 2, ("unrecognized arguments: --count 5", "see --help")),
}


@pytest.fixture(scope="module")
def wrong_server(tmp_path_factory) -> str:
    """A plain HTTP server on 127.0.0.1: it answers, but with HTML (404 for GET, 501 for POST), not the API."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path_factory.mktemp("www")))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


@pytest.mark.parametrize("case", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_user_mistake_is_answered_with_one_line_saying_what_to_do(case, tmp_path, wrong_server):
    (tmp_path / "labels.csv").write_text("id,boneage,male\n1,120,True\n")
    fill = functools.partial(str.format, tmp=tmp_path, dead=f"http://127.0.0.1:{free_port()}", wrong=wrong_server)
    job, *args = fill(case.argv).split()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}  # nothing there: Ray must not be needed
    done = subprocess.run([sys.executable, f"jobs/{job}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.returncode == case.exit_code, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ")
    for words in case.says:
        assert fill(words) in line
    assert not (tmp_path / "prepared").exists()  # refused before any work


@pytest.mark.parametrize("edit, says", [
    ({"arch": "vgg16"}, "it holds vgg16_bn weights"),
    ({"head": [32]}, "3 tensors differ in shape, e.g. head.1.weight is [16, 516] there, [32, 516] here"),
], ids=["another architecture", "another head size"])
def test_the_serve_builder_refuses_a_bundle_that_does_not_match_its_architecture(edit, says, tmp_path):
    """bundle.json edited after export: the checksum (of model.pt) still holds, the architecture does not. The
    deployment builder that configs/serve.yaml names says so in one line, before any replica starts."""
    folder, _ = make_bundle(tmp_path / "bundle")
    meta = json.loads((folder / "bundle.json").read_text())
    meta["model"].update(edit)
    (folder / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as refused:
        build({"model_uri": str(folder)})
    message = str(refused.value)
    assert "\n" not in message and says in message and "re-export the bundle" in message
    assert message.startswith(f"{Path(folder) / 'model.pt'} does not fit the model bundle.json describes")

"""Model bundles: round trip, tamper detection, the registry's numbered versions, loading without Ray."""

import json
import subprocess
import sys

import pytest
import torch

from boneage.bundle import BundleError, load_bundle, register, resolve, versions, write_bundle
from boneage.config import load_config, to_dict
from boneage.model import build_model
from helpers import ROOT

SIZE = 64


def make_bundle(folder, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(overrides=["model.head=[16]", "model.dropout=0"]).model
    model = build_model(cfg, SIZE).eval()
    meta = {"name": "m", "model": to_dict(cfg), "image_size": SIZE, "target": {"mean": 120.0, "std": 40.0},
            "metrics": {"val_mae": 9.5}}
    return write_bundle(folder, model.state_dict(), meta), model


def test_round_trip_gives_the_same_predictions(tmp_path):
    folder, model = make_bundle(tmp_path / "b")
    loaded = load_bundle(folder)
    image, male = torch.rand(2, 1, SIZE, SIZE), torch.tensor([0.0, 1.0])
    with torch.no_grad():
        assert torch.equal(loaded.model(image, male), model(image, male))
        months = loaded.to_months(loaded.model(image, male))
    assert torch.allclose(months, model(image, male).detach() * 40.0 + 120.0)
    meta = json.loads((folder / "bundle.json").read_text())
    assert len(meta["weights_sha256"]) == 64 and meta["created"] and meta["code_version"]["package"]


def test_tampered_weights_are_refused(tmp_path):
    folder, _ = make_bundle(tmp_path / "b")
    data = bytearray((folder / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the checksum"):
        load_bundle(folder)


def test_incomplete_bundle_is_refused(tmp_path):
    folder, _ = make_bundle(tmp_path / "b")
    (folder / "bundle.json").unlink()
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(folder)


def test_registry_numbers_versions_and_resolves_references(tmp_path):
    first, _ = make_bundle(tmp_path / "one", seed=1)
    second, _ = make_bundle(tmp_path / "two", seed=2)
    root = tmp_path / "registry"
    assert register(first, root, "m") == root / "m" / "1"
    assert register(second, root, "m") == root / "m" / "2"
    assert register(first, root, "m") == root / "m" / "1"  # the same weights are not registered twice
    assert versions(root, "m") == [1, 2]
    assert resolve("m:latest", root) == root / "m" / "2"
    assert resolve("m:1", root) == root / "m" / "1"
    assert resolve(str(second), root) == second
    assert not list((root / "m").glob(".incoming-*"))  # no staging leftovers
    with pytest.raises(BundleError, match="no version '7'; registered: 1, 2, latest"):
        resolve("m:7", root)
    with pytest.raises(BundleError, match="no model named 'x'"):
        resolve("x:latest", root)
    with pytest.raises(BundleError, match="neither a bundle folder nor a registry reference"):
        resolve("no-such-folder", root)


def test_loading_a_bundle_does_not_need_ray(tmp_path):
    folder, _ = make_bundle(tmp_path / "b")
    code = ("import sys; from boneage.bundle import load_bundle; load_bundle(sys.argv[1]); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, check=True, timeout=120)

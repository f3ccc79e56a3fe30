"""Model bundles: round trip, tamper detection, the registry's numbered versions, loading without Ray."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from boneage.bundle import (BUNDLE_FORMAT, BundleError, BundleMeta, TargetScale, load_bundle,
                            promote_if_better, read_best, register, resolve, versions)
from boneage.config import ModelConfig
from helpers import ROOT, make_bundle

SIZE = 64
# bundle.json as jobs/train.py wrote it before BundleMeta (format 1, the demo's model at 32 px): it must keep loading.
FORMAT_1 = Path(__file__).parent / "fixtures" / "bundle-format1.json"


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
    assert meta["format"] == BUNDLE_FORMAT and loaded.meta == BundleMeta.load(folder)


def test_a_bundle_json_written_before_bundle_meta_still_loads(tmp_path):
    shutil.copy(FORMAT_1, tmp_path / "bundle.json")
    meta = BundleMeta.load(tmp_path)
    assert meta.name == "boneage-vgg16" and meta.image_size == 32 and meta.format == 1
    assert meta.model == ModelConfig(arch="vgg16_bn", weights="none", pooling="avg", head=[256], dropout=0.2,
                                     sex_embedding=16)
    assert meta.target == TargetScale(mean=127.48787446504993, std=40.88305137904061)
    assert meta.data.manifest_fingerprint.startswith("12effb16") and meta.data.prepared.endswith("phantoms-32")
    assert meta.val_mae == 11.674650969328704 and meta.metrics["val_mae_mean_baseline"] == 31.692041672070204
    assert meta.train["precision"] == "auto" and meta.augment["zoom_range"] == 0.1
    assert meta.weights_sha256.startswith("7391f18e") and meta.created == "2026-12-01T17:57:40+00:00"
    assert meta.trust is None  # format 1 had no trust signals
    meta.save(tmp_path / "again")  # and it writes back what it read, in this code's format
    assert json.loads((tmp_path / "again" / "bundle.json").read_text()) == {
        **json.loads(FORMAT_1.read_text()), "trust": None, "ood_sha256": "", "members": [],
        "format": BUNDLE_FORMAT}


def test_fields_added_later_load_with_their_defaults_and_unknown_ones_are_ignored(tmp_path):
    """A bundle written before a field existed gets its default; one written by newer code of the same format
    keeps loading here."""
    old = json.loads(FORMAT_1.read_text())
    for later in ("metrics", "run", "checkpoint", "preprocessing", "train", "augment", "code_version", "created"):
        del old[later]
    (tmp_path / "bundle.json").write_text(json.dumps({**old, "calibration": {"slope": 1.0}}))
    meta = BundleMeta.load(tmp_path)
    assert meta.metrics == {} and meta.run == "" and meta.train == {} and meta.image_size == 32
    assert not hasattr(meta, "calibration")


@pytest.mark.parametrize("found", [BUNDLE_FORMAT + 1, None], ids=["newer format", "no format"])
def test_a_bundle_of_another_format_is_refused_in_one_line(found, tmp_path):
    folder, _ = make_bundle(tmp_path / "b")
    meta = json.loads((folder / "bundle.json").read_text())
    meta["format"] = found
    (folder / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as refused:
        load_bundle(folder)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'bundle.json'} is bundle format {found}; this code reads formats 1, 2")


def test_a_bundle_json_without_a_required_field_is_refused(tmp_path):
    meta = json.loads(FORMAT_1.read_text())
    del meta["target"], meta["image_size"]
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="lacks image_size, target: it is not a complete bundle description"):
        BundleMeta.load(tmp_path)


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
    with pytest.raises(BundleError, match="no version '7'; registered: 1, 2, latest, best"):
        resolve("m:7", root)
    with pytest.raises(BundleError, match="no model named 'x'"):
        resolve("x:latest", root)
    with pytest.raises(BundleError, match="neither a bundle folder nor a registry reference"):
        resolve("no-such-folder", root)


def test_registering_hashes_only_the_new_bundle(tmp_path):
    """Stored versions are matched by the checksums they recorded: a damaged model.pt of version 1 is not read
    (re-hashing it would refuse the registration), however many versions there are."""
    first, _ = make_bundle(tmp_path / "one", seed=1)
    second, _ = make_bundle(tmp_path / "two", seed=2)
    root = tmp_path / "registry"
    stored = register(first, root, "m")
    (stored / "model.pt").write_bytes(b"damaged")
    assert register(second, root, "m") == root / "m" / "2"
    assert register(first, root, "m") == stored  # found by its recorded checksum, without reading model.pt
    with pytest.raises(BundleError, match="does not match the checksum"):
        load_bundle(stored)  # loading still checks


def test_loading_a_bundle_does_not_need_ray(tmp_path):
    folder, _ = make_bundle(tmp_path / "b")
    code = ("import sys; from boneage.bundle import load_bundle; load_bundle(sys.argv[1]); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, check=True, timeout=120)


def test_best_moves_only_to_a_better_bundle_on_the_same_validation_split(tmp_path):
    root = tmp_path / "registry"
    v1 = register(make_bundle(tmp_path / "a", seed=1, val_mae=12.0)[0], root, "m")
    v2 = register(make_bundle(tmp_path / "b", seed=2, val_mae=15.0)[0], root, "m")
    v3 = register(make_bundle(tmp_path / "c", seed=3, val_mae=9.0)[0], root, "m")
    v4 = register(make_bundle(tmp_path / "d", seed=4, val_mae=1.0, data="manifest-b")[0], root, "m")
    with pytest.raises(BundleError, match="no best version yet"):
        resolve("m:best", root)
    first = promote_if_better(v1, root, "m")
    assert first.promoted and "no best yet" in first.message
    worse = promote_if_better(v2, root, "m")
    assert not worse.promoted and "does not beat" in worse.message
    assert resolve("m:best", root) == v1
    better = promote_if_better(v3, root, "m")
    assert better.promoted and resolve("m:best", root) == v3
    other_data = promote_if_better(v4, root, "m")
    assert not other_data.promoted and "not comparable" in other_data.message
    assert read_best(root, "m")["version"] == 3 and read_best(root, "m")["val_mae"] == 9.0


def test_a_bundle_compared_with_itself_says_it_is_already_best(tmp_path):
    root = tmp_path / "registry"
    version = register(make_bundle(tmp_path / "a", val_mae=9.75)[0], root, "m")
    assert promote_if_better(version, root, "m").promoted
    again = promote_if_better(version, root, "m")
    assert not again.promoted and again.message == "version 1 is already m:best (val MAE 9.75)"

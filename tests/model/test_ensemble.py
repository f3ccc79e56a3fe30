"""Ensemble bundles (issue 15): several models exported as one bundle that answers their mean."""

from __future__ import annotations

import numpy as np
import pytest

from boneage.bundle import BundleError, load_bundle, read_best, write_ensemble
from boneage.config import AnswerConfig
from boneage.dataset import load_split
from boneage.inference import BoneAgePredictor
from helpers import make_bundle


@pytest.fixture(scope="module")
def ensemble(ensemble_registry):
    return load_bundle(ensemble_registry / "ens" / "1")


@pytest.fixture(scope="module")
def val(prepared_dir):
    split = load_split(prepared_dir, "val")
    return split["image"][:, 0].numpy(), split["male"].numpy().astype(bool), split["boneage"].numpy()


def test_the_bundle_holds_every_member_and_answers_their_mean_and_spread(ensemble, val):
    canvases, male, _ = val
    assert len(ensemble.members) == 3 and ensemble.members[0] is ensemble.model
    assert [m.weights for m in ensemble.meta.members] == ["model.pt", "member-1.pt", "member-2.pt"]
    assert [m.val_mae for m in ensemble.meta.members] == [11.0, 12.0, 13.0]
    alone = np.stack([BoneAgePredictor(load_bundle(ensemble.path.parent.parent.parent / f"member-{seed}"),
                                       AnswerConfig(calibrate=False)).predict_raw(canvases, male)
                      for seed in (1, 2, 3)])  # (3, N): each member's own bundle
    answers = BoneAgePredictor(ensemble).answer(canvases, male)
    np.testing.assert_allclose(answers.raw_months, alone.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(answers.spread, alone.std(axis=0, ddof=1), atol=1e-4)
    assert (answers.spread > 0).all() and answers.ood_scores is not None  # the members differ; a detector fitted


def test_its_val_mae_and_signals_are_the_ensembles_own(ensemble, val):
    canvases, male, true = val
    raw = BoneAgePredictor(ensemble, AnswerConfig(calibrate=False)).predict_raw(canvases, male)
    assert ensemble.meta.val_mae == pytest.approx(np.mean(np.abs(raw - true)), abs=1e-6)
    assert ensemble.meta.trust.val_raw.overall.mae == pytest.approx(ensemble.meta.val_mae)
    assert ensemble.ood is not None and ensemble.meta.ood_sha256
    assert read_best(ensemble.path.parent.parent, "ens")["version"] == 1  # the first bundle of its name: promoted


def test_its_heat_map_is_the_mean_of_its_members(ensemble, val):
    canvases, male, _ = val
    predictor = BoneAgePredictor(ensemble)
    members = [BoneAgePredictor(load_bundle(ensemble.path.parent.parent.parent / f"member-{seed}"))
               for seed in (1, 2, 3)]
    expected = np.mean([m.heatmaps(canvases[:2], male[:2]) for m in members], axis=0)
    np.testing.assert_allclose(predictor.heatmaps(canvases[:2], male[:2]), expected, atol=1e-5)


def test_a_damaged_or_missing_member_or_detector_stops_loading(ensemble, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ensemble.path, copy)
    (copy / "member-2.pt").write_bytes((copy / "member-2.pt").read_bytes()[:-10])
    with pytest.raises(BundleError, match="member-2.pt does not match the checksum"):
        load_bundle(copy)
    (copy / "member-2.pt").unlink()
    with pytest.raises(BundleError, match="lacks member-2.pt"):
        load_bundle(copy)
    shutil.copy(ensemble.path / "member-2.pt", copy)
    (copy / "ood.npz").unlink()
    with pytest.raises(BundleError, match="lacks ood.npz"):
        load_bundle(copy)


def test_members_that_do_not_answer_alike_are_refused(tmp_path, ensemble):
    small, _ = make_bundle(tmp_path / "a", 1, size=32)
    large, _ = make_bundle(tmp_path / "b", 2, size=64)
    with pytest.raises(BundleError, match="image size"):
        write_ensemble(tmp_path / "ens", [small, large])
    other_data, _ = make_bundle(tmp_path / "c", 3, size=32, data="manifest-b")
    with pytest.raises(BundleError, match="prepared data"):
        write_ensemble(tmp_path / "ens", [small, other_data])
    with pytest.raises(BundleError, match="an ensemble already"):
        write_ensemble(tmp_path / "ens", [ensemble.path, small])
    with pytest.raises(BundleError, match="at least 2 members"):
        write_ensemble(tmp_path / "ens", [small])

"""Issue 15, section 3: how well the Mahalanobis detector (boneage.ood) tells hand radiographs from other images.

    python bench/ood.py [--phantom-bundle FOLDER --phantom-data FOLDER] [--real-bundle FOLDER --real-data FOLDER]

For each model (the demo's phantom model on its phantom splits; the RSNA thumbnails model on the real splits), fits
detectors on the train split's features with the threshold set on val (at most 1% of hands rejected), for several
choices of backbone stages, and reports the share rejected of: the test split's hands, each kind of the
non-hand corpus (boneage.phantoms.nonhands.ood_corpus at the model's size), and the test hands mirrored and
inverted. A mirrored hand is to be accepted (the models were trained with horizontal flips): its MAE against the
unmirrored reading is reported too. Targets: >= 95% of non-hands rejected, <= 2% of test hands rejected.
Features are cached per bundle under outputs/ood-features (the forward passes are the slow part).

``as_shipped``: the detector an export fits (``boneage.signals.fit_ood_detector`` on a copy of the bundle: up to
``OOD_FIT_IMAGES`` training images and their mirror images, in the predictor's precision), measured through the
served path (``BoneAgePredictor.answer(...).unlike_hands``), which is what the service and the bulk jobs refuse.
Results: bench/results/ood.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from boneage.artifacts import sha256_json  # noqa: E402
from boneage.bundle import load_bundle, resolve, store_ood_detector  # noqa: E402
from boneage.inference import BoneAgePredictor  # noqa: E402
from boneage.dataset import load_split  # noqa: E402
from boneage.ood import OodDetector, pooled_features  # noqa: E402
from boneage.phantoms.nonhands import ood_corpus  # noqa: E402
from boneage.signals import OOD_FIT_IMAGES, fit_ood_detector, in_batches  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALL_STAGES = ("block1", "block2", "block3", "block4", "block5")
CHOICES = {"block5": ("block5",), "block4-5": ("block4", "block5"), "block3-5": ("block3", "block4", "block5"),
           "block1-5": ALL_STAGES}
NON_HANDS = ("blank", "uniform_noise", "gaussian_noise", "text", "photograph", "chest", "inverted_hand",
             "inverted_test_hand")


def inverted(canvases: np.ndarray) -> np.ndarray:
    """Negative films: each canvas's film (its non-black box) inverted, the black padding kept, as framing a
    negative would give."""
    out = canvases.copy()
    for image, source in zip(out, canvases):
        rows, cols = np.flatnonzero(source.any(axis=1)), np.flatnonzero(source.any(axis=0))
        if len(rows):
            box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            image[box] = 255 - source[box]
    return out


def image_sets(data: Path, size: int, test_limit: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every set of canvases measured, with its sex column: the splits, the corpus, the altered test hands."""
    sets = {}
    for split in ("train", "val", "test"):
        tensors = load_split(data, split)
        sets[split] = (tensors["image"][:, 0].numpy(), tensors["male"].numpy().astype(bool))
        if split == "test":
            sets["test_boneage"] = tensors["boneage"].numpy()
    sets["mirrored_train"] = (np.ascontiguousarray(sets["train"][0][:, :, ::-1]), sets["train"][1])
    test, male = sets["test"][0][:test_limit], sets["test"][1][:test_limit]
    sets["mirrored_test_hand"] = (np.ascontiguousarray(test[:, :, ::-1]), male)
    sets["inverted_test_hand"] = (inverted(test), male)
    for kind, canvases in ood_corpus(size, seed=0, per_kind=24).items():
        sets[kind] = (canvases, np.zeros(len(canvases), bool))
    return sets


def months(bundle, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
    """The model's raw reading in months."""
    with torch.inference_mode():
        out = [bundle.to_months(bundle.model(torch.from_numpy(canvases[i:i + 128]).unsqueeze(1),
                                             torch.from_numpy(male[i:i + 128].astype(np.float32))))
               for i in range(0, len(canvases), 128)]
    return torch.cat(out).numpy()


def features(bundle_dir: Path, data: Path, cache_root: Path, test_limit: int) -> dict[str, np.ndarray]:
    """Pooled features of all five stages for every set, and the readings of test hands and their mirror images;
    cached by bundle and data."""
    cache = cache_root / f"{sha256_json([str(bundle_dir.resolve()), str(data.resolve()), test_limit])[:16]}.npz"
    found = {}
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            found = dict(stored)
    bundle = load_bundle(bundle_dir)
    sets = image_sets(data, bundle.meta.image_size, test_limit)
    if set(sets) <= set(found):
        return found
    found["test_boneage"] = sets.pop("test_boneage")
    for name, (canvases, male) in sets.items():
        if name in found:
            continue
        print(f"features: {name} ({len(canvases)} images)", flush=True)
        found[name] = pooled_features(bundle.model, canvases, male, stages=ALL_STAGES)
    test, male = sets["test"][0][:test_limit], sets["test"][1][:test_limit]
    found["test_months"] = months(bundle, test, male)
    found["mirrored_months"] = months(bundle, sets["mirrored_test_hand"][0], male)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **found)
    return found


def columns(net_stage_channels: dict[str, int], stages: tuple[str, ...]) -> np.ndarray:
    """Which columns of the all-stage features belong to ``stages``."""
    bounds = np.cumsum([0, *net_stage_channels.values()])
    index = {name: np.arange(bounds[i], bounds[i + 1]) for i, name in enumerate(net_stage_channels)}
    return np.concatenate([index[name] for name in stages])


def measure(found: dict[str, np.ndarray], stages: tuple[str, ...], mirrored: bool) -> dict:
    """Rejection shares of a detector fitted on ``stages``' features (and on the mirrored train split's too, as
    ``OodDetector.fit_on_images`` does for a model trained with flips)."""
    pick = columns({"block1": 64, "block2": 128, "block3": 256, "block4": 512, "block5": 512}, stages)
    train = np.concatenate([found["train"], found["mirrored_train"]]) if mirrored else found["train"]
    detector = OodDetector.fit(train[:, pick], found["val"][:, pick], stages=stages)
    rejected = {name: float(detector.rejects(found[name][:, pick]).mean())
                for name in ("test", *NON_HANDS, "mirrored_hand", "mirrored_test_hand")}
    non_hand = np.concatenate([detector.rejects(found[name][:, pick]) for name in NON_HANDS])
    return {"detector": detector.summary(), "test_hands_rejected": rejected.pop("test"),
            "non_hands_rejected": float(non_hand.mean()), "non_hand_images": int(len(non_hand)),
            "rejected_by_kind": rejected,
            "meets_targets": bool(non_hand.mean() >= 0.95 and detector.rejects(found["test"][:, pick]).mean() <= 0.02)}


def as_shipped(bundle_dir: Path, data: Path, test_limit: int) -> dict:
    """The export's detector, fitted on a copy of the bundle and measured through the predictor's answers."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(bundle_dir, copy)
        started = time.perf_counter()
        detector = fit_ood_detector(copy, str(data))
        fit_seconds = time.perf_counter() - started
        store_ood_detector(copy, detector)
        predictor = BoneAgePredictor(load_bundle(copy))
    sets = image_sets(data, predictor.image_size, test_limit)
    rejected = {name: in_batches(lambda c, m: predictor.answer(c, m).unlike_hands, *sets[name])
                for name in ("test", *NON_HANDS, "mirrored_hand", "mirrored_test_hand")}
    non_hand = np.concatenate([rejected[name] for name in NON_HANDS])
    test = rejected.pop("test")
    return {"detector": detector.summary(), "fit_images": min(len(sets["train"][0]), OOD_FIT_IMAGES),
            "fit_seconds": fit_seconds, "computes_in": predictor.computes_in,
            "test_hands_rejected": float(test.mean()), "test_hands": int(len(test)),
            "non_hands_rejected": float(non_hand.mean()), "non_hand_images": int(len(non_hand)),
            "rejected_by_kind": {name: float(values.mean()) for name, values in rejected.items()},
            "meets_targets": bool(non_hand.mean() >= 0.95 and test.mean() <= 0.02)}


def model_report(bundle_dir: Path, data: Path, cache_root: Path, test_limit: int) -> dict:
    found = features(bundle_dir, data, cache_root, test_limit)
    truth = found["test_boneage"][:test_limit]
    return {"bundle": str(bundle_dir), "data": str(data),
            "images": {"train": len(found["train"]), "val": len(found["val"]), "test": len(found["test"])},
            "mirrored_test_hands": {"images": len(truth),
                                    "mae": float(np.abs(found["test_months"] - truth).mean()),
                                    "mae_mirrored": float(np.abs(found["mirrored_months"] - truth).mean())},
            "as_shipped": as_shipped(bundle_dir, data, test_limit),
            "fit_on_train": {name: measure(found, stages, False) for name, stages in CHOICES.items()},
            "fit_on_train_and_mirrored_train": {name: measure(found, stages, True) for name, stages in CHOICES.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantom-bundle", type=Path, default=None, help="default: boneage-vgg16:best in "
                                                                          "outputs/registry (make demo's model)")
    parser.add_argument("--phantom-data", type=Path, default=ROOT / "outputs/prepared/phantoms-32")
    parser.add_argument("--real-bundle", type=Path, default=ROOT.parent / "main/outputs/bench/rsna-thumbs/registry/"
                                                                          "boneage-vgg16-rsna-thumbs/1")
    parser.add_argument("--real-data", type=Path, default=ROOT.parent / "main/outputs/bench/rsna-thumbs/prepared-64")
    parser.add_argument("--test-limit", type=int, default=400, help="test hands mirrored and inverted")
    parser.add_argument("--cache", type=Path, default=ROOT / "outputs/ood-features")
    args = parser.parse_args()
    phantom = args.phantom_bundle or resolve("boneage-vgg16:best", ROOT / "outputs/registry")  # make demo's
    write_result("ood", {"phantom": model_report(phantom, args.phantom_data, args.cache, args.test_limit),
                         "real_thumbnails": model_report(args.real_bundle, args.real_data, args.cache,
                                                         args.test_limit),
                         "targets": {"non_hands_rejected_min": 0.95, "test_hands_rejected_max": 0.02}})


if __name__ == "__main__":
    main()

"""What an exported bundle learns about its own answers (issue 15), fitted when training, tuning or the ensemble
job exports it: the trust signals (:mod:`boneage.trust`: bias correction and intervals, on the validation split)
and the out-of-distribution detector (:mod:`boneage.ood`: training images' features, threshold on validation).

Both read the bundle's answers as served (:class:`~boneage.inference.BoneAgePredictor`, its precision and memory
format), so what is fitted is what the service, the bulk jobs and evaluation later apply.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.bundle import load_bundle, read_meta, store_ood_detector
from boneage.cluster import wants_gpu
from boneage.config import AnswerConfig, ScoringConfig
from boneage.dataset import images_from_column, prepared_rows
from boneage.ood import OodDetector
from boneage.trust import TrustSignals

log = logging.getLogger(__name__)

# Training images the detector's Gaussian is fitted on (and as many mirrored): a few thousand estimate a
# 1,472-dimensional shrunk covariance well, and an export stays a minute or two on a CPU head at 64 px.
OOD_FIT_IMAGES = 4096
BATCH = 64  # images per forward pass while fitting


def attach_signals(bundle: Path, prepared: str) -> None:
    """Fit the bundle's trust signals and out-of-distribution detector on the prepared data it was trained and
    chosen on, and store them in the bundle (``bundle.json``, ``ood.npz``): every exported bundle carries them."""
    log.info("fitting the bias correction and prediction intervals on the validation split ...")
    trust = fit_trust_signals(bundle, prepared)
    if trust is None:
        log.warning("the validation split of %s is empty: the bundle has no bias correction, intervals or "
                    "out-of-distribution detector", prepared)
        return
    dataclasses.replace(read_meta(bundle), trust=trust).save(bundle)
    raw, corrected = trust.val_raw.overall, trust.val_calibrated.overall
    log.info("bias correction: val MAE %.2f -> %.2f months, bias %+.2f -> %+.2f (true = %.3f x predicted %+.2f)",
             raw.mae, corrected.mae, raw.bias, corrected.bias, trust.calibration.slope, trust.calibration.intercept)
    log.info("fitting the out-of-distribution detector on up to %d training images ...", OOD_FIT_IMAGES)
    detector = fit_ood_detector(bundle, prepared)
    store_ood_detector(bundle, detector)
    log.info("out-of-distribution detector: threshold %.1f, %.1f%% of validation hands above it",
             detector.threshold, 100 * detector.val_rejection)


def fit_trust_signals(bundle: Path, data: str, split: str = "val") -> TrustSignals | None:
    """A bundle's trust signals, fitted on its raw answers for the prepared ``split`` of ``data`` (when the bundle
    is exported); None for an empty split. The answers come from GPU actors when the cluster has GPUs (a large
    model on a CPU head would take minutes), else from this process (no actors to start; also when this process
    is not connected to a cluster, e.g. re-exporting a finished run)."""
    import ray

    gpus = ray.is_initialized() and wants_gpu("auto", "use_gpu")
    answers = raw_answers_on_gpus(bundle, data, split) if gpus else raw_answers_here(bundle, data, split)
    if answers.empty:
        return None
    return TrustSignals.fit(answers["raw_months"], answers["boneage"], answers["male"].to_numpy(bool))


def raw_answers_on_gpus(bundle: Path, data: str, split: str, use_gpu: bool = True) -> pd.DataFrame:
    """What :func:`raw_answers_here` gives, scored by Ray Data actors (one per GPU with ``use_gpu``)."""
    from boneage.scoring import score

    settings = ScoringConfig(bundle=str(bundle), data=data, split=split, calibrate=False, reject_ood=False,
                             use_gpu=use_gpu)
    answers = score(settings, registry_root="").predictions
    return pd.DataFrame({"id": answers["id"], "male": answers["sex"] == "M", "boneage": answers["boneage"],
                         "raw_months": answers["bone_age_months_raw"]})


def raw_answers_here(bundle: Path, data: str, split: str) -> pd.DataFrame:
    """``id, male, boneage, raw_months``: the bundle's uncorrected answers for a prepared split, computed in this
    process without Ray (on its GPU when it has one): for a validation split, faster than starting actors."""
    predictor = _raw_predictor(bundle)
    rows = prepared_rows(data, split)
    canvases, male = images_from_column(rows["image"].to_numpy(), predictor.image_size), rows["male"].to_numpy(bool)
    raw = in_batches(predictor.predict_raw, canvases, male)
    return rows[["id", "male", "boneage"]].assign(raw_months=raw if len(raw) else np.zeros(0))


def fit_ood_detector(bundle: Path, data: str) -> OodDetector:
    """The bundle's detector: a Gaussian of its features of up to :data:`OOD_FIT_IMAGES` training images (and of
    them mirrored, when it was trained with horizontal flips), the threshold on the validation split."""
    predictor = _raw_predictor(bundle)
    train = prepared_rows(data, "train")
    train = train.sample(n=min(len(train), OOD_FIT_IMAGES), random_state=0).sort_index()
    val = prepared_rows(data, "val")
    size = predictor.image_size
    return OodDetector.fit_on_images(
        lambda canvases, male: in_batches(predictor.features, canvases, male),
        (images_from_column(train["image"].to_numpy(), size), train["male"].to_numpy(bool)),
        (images_from_column(val["image"].to_numpy(), size), val["male"].to_numpy(bool)),
        mirrored=bool(predictor.bundle.meta.augment.get("horizontal_flip", False)))


def _raw_predictor(bundle: Path):
    """The bundle's predictor without bias correction or rejection, on this process's GPU when it has one."""
    import torch

    from boneage.inference import BoneAgePredictor

    return BoneAgePredictor(load_bundle(bundle), AnswerConfig(calibrate=False, reject_ood=False),
                            device="cuda" if torch.cuda.is_available() else "cpu")


def in_batches(compute, canvases: np.ndarray, male: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """``compute(canvases, male)`` over batches of ``batch_size`` images, its results concatenated."""
    parts = [compute(canvases[i:i + batch_size], male[i:i + batch_size]) for i in range(0, len(canvases), batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0)

"""The evaluate job: score a labelled set with a model bundle, then write ``metrics.json`` and ``report.html``.

Scoring is the predict job's (:mod:`boneage.scoring`: Ray Data, an actor pool, the service's own decoding and
precision), so ``metrics.json``'s ``mae`` is the MAE of exactly the answers the service would give for these images.
The output folder ``eval.out`` holds::

    metrics.json          the figures (boneage.metrics.EvaluationMetrics), overall, by sex and by age band
    report.html           one self-contained page: figures, Grad-CAM gallery, augmentation preview, localisation
    predictions.csv       every scored image; predictions.rejects.csv: every image left out, with its reason

It is built in a temporary sibling and renamed into place: a failed run never leaves half a report.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from boneage.artifacts import atomic_directory
from boneage.augment import write_preview
from boneage.bundle import load_bundle
from boneage.config import AugmentConfig, Config, EvalConfig, load_config, parse_section
from boneage.dataset import CONFIG
from boneage.errors import JobError
from boneage.inference import BoneAgePredictor, Radiograph, encode_png
from boneage.localisation import LocalisationScore, canvas_boxes, localisation_scores
from boneage.metrics import BundleRef, DataRef, EvaluationMetrics, evaluate_predictions
from boneage.report import GalleryCase, build_report, pick_gallery_cases
from boneage.scoring import ScoredSet, load_canvases, score, write_predictions

log = logging.getLogger(__name__)

METRICS, REPORT, PREDICTIONS = "metrics.json", "report.html", "predictions.csv"
BOXES = "boxes.csv"  # the phantom generator's age-bearing structures, beside its labels
# The report compares the explainer serving uses with the Grad-CAM it replaced and the runner-up on the demo model
# (bench/localisation.py compares every one in EXPLAINERS, at 12x the cost).
COMPARED_EXPLAINERS = ("gradcam-block5", "layercam-block2+3-raw")
GALLERY_DISPLAY = 192  # pixels per side of a gallery image: small canvases are shown enlarged
PREVIEW_IMAGES = 8


class NothingToEvaluate(JobError, ValueError):
    """The scored set has no true bone ages: evaluation needs labels (jobs/predict.py scores unlabelled sets)."""


@dataclass
class EvaluationOutcome:
    """What the evaluate job wrote, and its headline figures."""

    metrics: EvaluationMetrics
    folder: Path

    @property
    def report(self) -> Path:
        return self.folder / REPORT

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS


def run_evaluation(cfg: Config) -> EvaluationOutcome:
    """Score ``eval``'s set with its bundle, then write the metrics, predictions and report into ``eval.out``."""
    settings = cfg.eval
    scored = score(settings, cfg.registry.root)
    labelled = scored.predictions["boneage"].notna()
    if not labelled.any():
        raise NothingToEvaluate(f"none of the {len(labelled)} scored images has a true bone age: evaluation needs "
                                "a labelled set (jobs/predict.py scores unlabelled ones)")
    predictor = BoneAgePredictor(load_bundle(scored.bundle_path))
    localisation = _localisation(predictor, scored, settings)
    metrics = evaluate_predictions(scored.predictions, scored.training_mean_months, settings.bootstrap_resamples,
                                   settings.seed, scored.calibrated, scored.interval_level)
    metrics = metrics.with_sources(_bundle_ref(scored), _data_ref(scored), rejected=len(scored.rejects),
                                   localisation=localisation)
    with atomic_directory(settings.out) as tmp:
        write_predictions(scored, tmp / PREDICTIONS)
        metrics.save(tmp)
        gallery = gallery_cases(predictor, scored, settings.gallery_cases)
        build_report(metrics, scored.predictions, gallery, _augmentation_preview(predictor, scored), tmp)
    return EvaluationOutcome(metrics, Path(settings.out))


def _bundle_ref(scored: ScoredSet) -> BundleRef:
    return BundleRef(scored.bundle_reference, str(scored.bundle_path), scored.bundle_sha256)


def _data_ref(scored: ScoredSet) -> DataRef:
    source = scored.source
    return DataRef(source.labels, source.images, source.data, source.split, source.fingerprint)


def gallery_cases(predictor: BoneAgePredictor, scored: ScoredSet, per_kind: int) -> list[GalleryCase]:
    """The ``per_kind`` best, median and worst cases by absolute error, each with its Grad-CAM overlay."""
    picks = pick_gallery_cases(scored.predictions, per_kind)
    rows = scored.predictions.set_index("id")
    canvases = load_canvases(scored.source, [case for _, case in picks])
    return [_gallery_case(predictor, kind, case, rows.loc[case], canvas)
            for (kind, case), canvas in zip(picks, canvases, strict=True)]


def _gallery_case(predictor: BoneAgePredictor, kind: str, case: str, row: pd.Series,
                  canvas: np.ndarray) -> GalleryCase:
    """One case: the model canvas enlarged for display, and its heat map blended over it."""
    display = np.asarray(Image.fromarray(canvas).resize((GALLERY_DISPLAY, GALLERY_DISPLAY), Image.Resampling.BILINEAR))
    explanation = predictor.explain(Radiograph(canvas, display, dicom_sex=None), row.sex == "M")
    return GalleryCase(id=case, kind=kind, true_months=float(row.boneage),
                       predicted_months=float(row.bone_age_months), sex=row.sex, image_png=encode_png(display),
                       overlay_png=explanation.overlay_png)


def _augmentation_preview(predictor: BoneAgePredictor, scored: ScoredSet) -> bytes | None:
    """The training config's augmentations (as the bundle records them) on a few of the evaluated images."""
    if not predictor.bundle.meta.augment:
        return None
    augment = parse_section(AugmentConfig, predictor.bundle.meta.augment, "augment")
    canvases = load_canvases(scored.source, list(scored.predictions["id"][:PREVIEW_IMAGES]))
    images = torch.from_numpy(canvases).unsqueeze(1)  # (N, 1, S, S) uint8
    with tempfile.TemporaryDirectory() as folder:
        return write_preview(images, augment, Path(folder) / "preview.png").read_bytes()


def _localisation(predictor: BoneAgePredictor, scored: ScoredSet, settings: EvalConfig) -> list[LocalisationScore]:
    """On phantom data (a boxes.csv of age-bearing structures beside the labels): how often each explainer's
    heat-map peak lands on one, against a uniformly random point. Empty for other data."""
    boxes_csv = _boxes_file(scored, settings)
    if boxes_csv is None:
        return []
    table = scored.predictions
    paths = _image_paths(scored)
    boxes = canvas_boxes(boxes_csv, paths, scored.source.image_size)
    ids = [i for i in table["id"] if i in boxes]
    if not ids:
        return []
    methods = list(dict.fromkeys([predictor.explainer_name, *COMPARED_EXPLAINERS]))
    log.info("localisation: heat-map peaks against %s on %d images, explainers %s", boxes_csv, len(ids),
             ", ".join(methods))
    male = table.set_index("id").loc[ids, "sex"].to_numpy() == "M"
    return localisation_scores(predictor, load_canvases(scored.source, ids), male, [boxes[i] for i in ids], methods)


def _boxes_file(scored: ScoredSet, settings: EvalConfig) -> Path | None:
    """``eval.boxes``, or the generator's boxes.csv in the image folder (for a prepared set: the one it was
    prepared from)."""
    if settings.boxes:
        return Path(settings.boxes)
    images = scored.source.images or _prepared_from(scored.source.data)
    candidate = Path(images) / BOXES if images else None
    return candidate if candidate is not None and candidate.is_file() else None


def _prepared_from(prepared: str) -> str:
    """The image folder a prepared dataset was made from (its saved config), or "" when unknown."""
    path = Path(prepared) / CONFIG
    return load_config(path).data.images if prepared and path.is_file() else ""


def _image_paths(scored: ScoredSet) -> dict[str, Path]:
    """Each scored id's original image file (the boxes are in its pixels)."""
    table = scored.predictions
    if (table["path"] != "").all():
        return dict(zip(table["id"], map(Path, table["path"]), strict=True))
    from boneage.rsna import index_images

    index = index_images(Path(_prepared_from(scored.source.data)))
    return {i: paths[0] for i, paths in index.items() if len(paths) == 1}


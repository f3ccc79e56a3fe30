"""Bulk inference with a model bundle: every image of a labels file, a folder or a prepared split, scored with
Ray Data, with every image left out reported with its reason.

Inputs (:class:`~boneage.config.ScoringConfig`): a labels file in any RSNA layout with its image folder (the Kaggle
test layout ``Case ID,Sex`` too, which has no ages), an image folder without labels (every image scored), or a
prepared split (``data`` + ``split``). Sex comes from the labels file or from the DICOM header (PatientSex), never
guessed: an image with neither is rejected as ``missing_sex``.

Scoring runs as Ray Data ``map_batches`` over an actor pool: each actor loads the bundle once, reads and frames
its batch's files with :func:`boneage.imaging.load_radiograph` (the model canvas of prepare and the service) and
answers with :meth:`boneage.inference.BoneAgePredictor.answer`, the service's own code and precision; so every
answer is the one the service gives for that file, and an image the service refuses as not a hand radiograph
(the bundle's out-of-distribution detector) is a ``not_a_hand_radiograph`` row of the rejects. GPU actors when the
cluster has GPUs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from boneage.artifacts import atomic_file, file_listing, sha256_file, sha256_json
from boneage.bundle import read_meta, resolve
from boneage.cluster import connect_to_ray, wants_gpu
from boneage.config import AnswerConfig, ScoringConfig
from boneage.dataset import images_from_column, prepared_rows, read_manifest, split_names, split_path
from boneage.deid import patient_sex
from boneage.errors import JobError
from boneage.imaging import REJECT_UNDECODABLE, ImageRejected, is_dicom, load_radiograph
from boneage.rsna import REJECT_AMBIGUOUS_IMAGE, REJECT_COLUMNS, index_images, read_labels, unlabeled_image_rejects

log = logging.getLogger(__name__)

REJECT_MISSING_SEX = "missing_sex"
REJECT_NOT_A_HAND = "not_a_hand_radiograph"
# bone_age_months as served (the bundle's bias correction applied unless turned off); interval_* around it at
# the settings' level (NaN for a bundle without trust signals); bone_age_months_raw as the network gives it;
# ood_score the distance from the training hands (NaN without a detector); ensemble_spread_months the SD of an
# ensemble's members (NaN for a single model)
PREDICTION_COLUMNS = ["id", "sex", "bone_age_months", "interval_low", "interval_high", "bone_age_months_raw",
                      "ood_score", "ensemble_spread_months", "boneage", "path"]
ANSWER_COLUMNS = PREDICTION_COLUMNS[2:8]
INPUT_COLUMNS = ["id", "path", "sex", "boneage"]  # a file to score; sex "" when the labels do not give it
SEX_LETTER = {True: "M", False: "F"}


class ScoringInputError(JobError, ValueError):
    """Inputs that cannot be scored with this bundle: found before any work starts."""


@dataclass
class ScoringSource:
    """What was scored."""

    labels: str  # the labels file ("" for a prepared folder or a folder without labels)
    images: str  # the image folder ("" for a prepared folder)
    data: str  # the prepared folder ("" for labels/images)
    split: str  # the prepared split ("" otherwise)
    fingerprint: str  # prepared: its manifest's fingerprint; else a hash of the labels file and the image listing
    image_size: int  # the bundle's, and so the canvases'
    max_image_megapixels: float = 64.0  # the decompression-bomb guard the files were decoded under


@dataclass
class ScoredSet:
    """The answers for every scored image, in input order, and every image left out with its reason."""

    predictions: pd.DataFrame  # PREDICTION_COLUMNS: id, sex (M/F), the answers, boneage (NaN if unknown), path
    rejects: pd.DataFrame  # rsna.REJECT_COLUMNS: id, path, reason (starting with a code, e.g. missing_sex)
    source: ScoringSource
    bundle_path: Path
    bundle_reference: str  # as given
    bundle_sha256: str  # of its model.pt (checked when loaded)
    training_mean_months: float  # the bundle's target mean: the predict-the-training-mean baseline
    calibrated: bool = False  # bone_age_months has the bundle's bias correction applied
    interval_level: float | None = None  # of interval_low/high; None: the bundle has no intervals
    ood_threshold: float | None = None  # ood_score above it is not a hand; None: the bundle has no detector
    ensemble_size: int = 1  # models averaged per answer; above 1, ensemble_spread_months is their SD

    def describe_answers(self) -> str:
        """One line on what the answers carry: the bias correction and the intervals, or why not."""
        corrected = "bias-corrected" if self.calibrated else "not bias-corrected"
        intervals = (f"with {self.interval_level:.0%} prediction intervals" if self.interval_level is not None else
                     "without intervals (the bundle was written before trust signals)")
        return f"answers: {corrected}, {intervals}"


@dataclass
class _Inputs:
    """What to score, before scoring: a table of files, or a prepared split."""

    files: pd.DataFrame | None  # INPUT_COLUMNS; None for a prepared split
    rejects: pd.DataFrame  # rows left out already (labels, ambiguous files, images without a labels row)
    source: ScoringSource


def score(settings: ScoringConfig, registry_root: str) -> ScoredSet:
    """Score the images ``settings`` name with its bundle (a folder or a reference in ``registry_root``). Inputs
    that do not fit the bundle fail before any work (:class:`ScoringInputError`)."""
    bundle = resolve(settings.bundle, registry_root).resolve()
    meta = read_meta(bundle)  # checks the weights' checksum
    inputs = collect_inputs(settings, meta.image_size)
    connect_to_ray()
    scored = _run_actors(inputs, settings, bundle)
    failed = scored["reason"] != ""
    rejects = pd.concat([inputs.rejects, scored.loc[failed, REJECT_COLUMNS]], ignore_index=True)
    predictions = scored.loc[~failed, PREDICTION_COLUMNS].reset_index(drop=True)
    return ScoredSet(predictions=predictions, rejects=rejects, source=inputs.source, bundle_path=bundle,
                     bundle_reference=settings.bundle, bundle_sha256=meta.weights_sha256,
                     training_mean_months=meta.target.mean, calibrated=settings.calibrate and meta.trust is not None,
                     interval_level=settings.interval_level if meta.trust is not None else None,
                     ood_threshold=_ood_threshold(bundle) if meta.ood_sha256 else None,
                     ensemble_size=len(meta.member_models()))


def _ood_threshold(bundle: Path) -> float:
    from boneage.ood import OodDetector

    return OodDetector.load(bundle).threshold


def collect_inputs(settings: ScoringConfig, image_size: int) -> _Inputs:
    """The rows to score and those left out already; :class:`ScoringInputError` for inputs that cannot be
    scored at ``image_size`` (the bundle's)."""
    area = settings.AREA
    if settings.data and (settings.labels or settings.images):
        raise ScoringInputError(f"set either {area}.data (a prepared folder) or {area}.labels/{area}.images, "
                                "not both")
    if settings.data:
        return _prepared_inputs(settings, image_size)
    if not settings.images:
        raise ScoringInputError(f"nothing to score: set {area}.images (with {area}.labels, or alone to score every "
                                f"image in it), or {area}.data and {area}.split")
    if settings.labels:
        return _labelled_inputs(settings, image_size)
    return _folder_inputs(settings, image_size)


def _prepared_inputs(settings: ScoringConfig, image_size: int) -> _Inputs:
    area = settings.AREA
    manifest = read_manifest(settings.data)
    if manifest["image_size"] != image_size:
        raise ScoringInputError(f"{area}.data={settings.data} was prepared at {manifest['image_size']} px, the model "
                                f"{settings.bundle} takes {image_size} px: prepare the data at {image_size} px "
                                f"(data.image_size={image_size}), or score the labels and images instead")
    if settings.split not in split_names(settings.data):
        raise ScoringInputError(f"{area}.split={settings.split!r} is not a split of {settings.data}; its splits "
                                f"are: {', '.join(split_names(settings.data))}")
    source = ScoringSource(labels="", images="", data=settings.data, split=settings.split,
                           fingerprint=manifest["fingerprint"], image_size=image_size,
                           max_image_megapixels=settings.max_image_megapixels)
    return _Inputs(files=None, rejects=pd.DataFrame(columns=REJECT_COLUMNS), source=source)


def _labelled_inputs(settings: ScoringConfig, image_size: int) -> _Inputs:
    table = read_labels(settings.labels, settings.images, blank_sex=True)
    named = set(table.table["id"]) | set(table.rejects["id"])
    if not named:
        raise ScoringInputError(f"{settings.AREA}.labels={settings.labels} has no rows")
    if not named & set(table.images):
        raise ScoringInputError(f"{settings.AREA}.labels={settings.labels} matches no images: none of its "
                                f"{len(named)} ids has an <id>.png/.jpg/.dcm under {settings.images}")
    files = table.table.assign(sex=table.table["male"].map(SEX_LETTER, na_action="ignore").fillna(""))
    rejects = pd.concat([table.rejects, unlabeled_image_rejects([table])], ignore_index=True)
    return _Inputs(files=files[INPUT_COLUMNS], rejects=rejects,
                   source=_raw_source(settings, table.images, image_size, sha256_file(settings.labels)))


def _folder_inputs(settings: ScoringConfig, image_size: int) -> _Inputs:
    """Every image under ``images``, sex from DICOM headers; an id with several files is ambiguous."""
    index = index_images(Path(settings.images))
    if not index:
        raise ScoringInputError(f"{settings.AREA}.images={settings.images} holds no .png/.jpg/.jpeg/.dcm/.dicom "
                                "files")
    single = {image_id: paths[0] for image_id, paths in sorted(index.items()) if len(paths) == 1}
    files = pd.DataFrame({"id": list(single), "path": [str(p) for p in single.values()], "sex": "",
                          "boneage": math.nan}, columns=INPUT_COLUMNS)
    rejects = pd.DataFrame(
        [(image_id, str(path), f"{REJECT_AMBIGUOUS_IMAGE}: {len(paths)} files for id {image_id}")
         for image_id, paths in sorted(index.items()) if len(paths) > 1 for path in paths], columns=REJECT_COLUMNS)
    return _Inputs(files=files, rejects=rejects, source=_raw_source(settings, index, image_size, ""))


def _raw_source(settings: ScoringConfig, index: dict[str, list[Path]], image_size: int,
                labels_sha256: str) -> ScoringSource:
    """A labels file and image folder, fingerprinted by the labels' content and the images' (path, size, mtime)."""
    listing = file_listing(p for paths in index.values() for p in paths)
    fingerprint = sha256_json({"labels_sha256": labels_sha256, "images": listing})
    return ScoringSource(labels=settings.labels, images=settings.images, data="", split="", fingerprint=fingerprint,
                         image_size=image_size, max_image_megapixels=settings.max_image_megapixels)


class BatchScorer:
    """A Ray Data actor: loads the bundle once, then answers batches of files or of prepared rows."""

    def __init__(self, bundle: str, image_size: int, max_megapixels: float, device: str, threads: int,
                 answers: AnswerConfig):
        import torch

        from boneage.bundle import load_bundle
        from boneage.inference import BoneAgePredictor

        torch.set_num_threads(threads)  # the actor's reserved CPUs: more threads only contend on a shared node
        self.image_size, self.max_megapixels = image_size, max_megapixels
        self.predictor = BoneAgePredictor(load_bundle(bundle), answers, max_megapixels=max_megapixels, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" in batch:  # a prepared split: decoded already, sex known
            canvases = images_from_column(batch["image"], self.image_size)
            sex = np.array([SEX_LETTER[bool(m)] for m in batch["male"]], dtype=object)
            reasons = np.full(len(canvases), "", dtype=object)
            paths = np.full(len(canvases), "", dtype=object)
        else:
            paths = batch["path"]
            canvases, sex, reasons = self._read_files(paths, batch["sex"])
        columns = {column: np.full(len(canvases), math.nan) for column in ANSWER_COLUMNS}
        ok = reasons == ""
        if ok.any():
            answers = self.predictor.answer(canvases[ok], sex[ok] == "M")
            interval = self.predictor.interval(answers.months, sex[ok] == "M") or (math.nan, math.nan)
            for name, values in zip(ANSWER_COLUMNS, (answers.months, *interval, answers.raw_months,
                                                     answers.ood_scores, answers.spread)):
                columns[name][ok] = math.nan if values is None else values
            for row in np.flatnonzero(ok)[answers.unlike_hands]:
                reasons[row] = self._not_a_hand(columns["ood_score"][row])
        return {"id": batch["id"], "path": paths, "sex": sex, "boneage": batch["boneage"].astype(np.float64),
                **columns, "reason": reasons}

    def _not_a_hand(self, score: float) -> str:
        return (f"{REJECT_NOT_A_HAND}: out-of-distribution score {score:.1f} above the model's threshold "
                f"{self.predictor.ood.threshold:.1f}: unlike the hand radiographs it was trained on")

    def _read_files(self, paths: np.ndarray, sexes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Model canvases, sex (given, or the DICOM header's) and reject reasons ('' when usable) of files."""
        size = self.image_size
        canvases = np.zeros((len(paths), size, size), dtype=np.uint8)
        sex, reasons = np.array(sexes, dtype=object), np.full(len(paths), "", dtype=object)
        for i, path in enumerate(paths):
            try:
                data = Path(path).read_bytes()
            except OSError as err:  # unreadable file (permissions, vanished)
                reasons[i] = f"{REJECT_UNDECODABLE}: cannot read file: {err}"
                continue
            if not sex[i]:  # the labels' sex, where they give one, is taken as it is: the header is not read
                sex[i] = (patient_sex(data) if is_dicom(data) else None) or ""
            if not sex[i]:
                reasons[i] = (f"{REJECT_MISSING_SEX}: no sex in the labels file"
                              f"{' nor PatientSex M/F in the DICOM header' if is_dicom(data) else ''}; it is never "
                              "guessed")
                continue
            try:
                canvases[i] = load_radiograph(data, size, self.max_megapixels)
            except ImageRejected as err:
                reasons[i] = err.reason
        return canvases, sex, reasons


def _run_actors(inputs: _Inputs, settings: ScoringConfig, bundle: Path) -> pd.DataFrame:
    """Every input row through the actor pool, in input order: the actors' columns, ``reason`` '' when scored."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from boneage.dataset import quiet_context

    table = inputs.files if inputs.files is not None else prepared_rows(settings.data, settings.split)
    if table.empty:
        return pd.DataFrame(columns=[*PREDICTION_COLUMNS, "reason"])
    context = quiet_context()
    context.execution_options.preserve_order = True  # answers in input order
    with DataContext.current(context):  # a dataset keeps the context it was created in
        # One block per batch, made here: the actors can take every CPU, so no read or repartition task would
        # ever find one (a 2-CPU cluster with 2 actors waited forever on a repartition).
        dataset = ray.data.from_pandas([table.iloc[i:i + settings.batch_size]
                                        for i in range(0, len(table), settings.batch_size)])
        gpu = wants_gpu(settings.use_gpu, f"{settings.AREA}.use_gpu")
        actors = min(settings.actors or _auto_actors(gpu), math.ceil(len(table) / settings.batch_size))
        log.info("scoring %d images with %d actor(s) on %s, batches of %d ...", len(table), actors,
                 "GPUs" if gpu else "CPUs", settings.batch_size)
        scored = dataset.map_batches(
            BatchScorer, batch_size=settings.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={"bundle": str(bundle), "image_size": inputs.source.image_size,
                                   "max_megapixels": settings.max_image_megapixels,
                                   "device": "cuda" if gpu else "cpu", "threads": 1,
                                   "answers": settings})  # a ScoringConfig is the AnswerConfig it carries
        # Ray Data hands back Arrow-backed columns, whose NaN is not missing: plain numpy ones, as in any table
        return scored.to_pandas().astype({**dict.fromkeys(["id", "path", "sex", "reason"], object),
                                          **dict.fromkeys(["boneage", *ANSWER_COLUMNS], "float64")})


def _auto_actors(gpu: bool) -> int:
    """One actor per GPU, or per CPU of the cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)))


def write_predictions(scored: ScoredSet, out_csv: str | Path) -> tuple[Path, Path]:
    """Write ``id, sex, bone_age_months`` (with ``interval_low, interval_high`` when the bundle has intervals,
    ``bone_age_months_raw`` when the answers are bias-corrected, ``ood_score`` when it has an out-of-distribution
    detector, ``ensemble_spread_months`` for an ensemble, ``boneage`` when any true age is known) to
    ``out_csv`` and the rejects to ``<stem>.rejects.csv`` beside it, each atomically; return both paths."""
    out_csv = Path(out_csv)
    rejects_csv = out_csv.with_name(f"{out_csv.stem}.rejects.csv")
    columns = ["id", "sex", "bone_age_months"]
    columns += ["interval_low", "interval_high"] if scored.interval_level is not None else []
    columns += ["bone_age_months_raw"] if scored.calibrated else []
    columns += ["ood_score"] if scored.ood_threshold is not None else []
    columns += ["ensemble_spread_months"] if scored.ensemble_size > 1 else []
    columns += ["boneage"] if scored.predictions["boneage"].notna().any() else []
    with atomic_file(out_csv) as tmp:
        scored.predictions[columns].to_csv(tmp, index=False)
    with atomic_file(rejects_csv) as tmp:
        scored.rejects.to_csv(tmp, index=False)
    return out_csv, rejects_csv


def load_canvases(source: ScoringSource, ids: Sequence[str]) -> np.ndarray:
    """``(N, S, S)`` uint8: the model canvases of those ids exactly as they were scored (re-decoded from their
    files, or read from the prepared split), in the order of ``ids``. For Grad-CAM galleries."""
    if source.data:
        table = pq.read_table(split_path(source.data, source.split), columns=["id", "image"],
                              filters=pc.field("id").isin(list(ids)))
        by_id = dict(zip(table["id"].to_pylist(), images_from_column(table["image"], source.image_size)))
        return np.stack([by_id[i] for i in ids]) if ids else _no_canvases(source)
    index = index_images(Path(source.images))
    canvases = [load_radiograph(index[i][0], source.image_size, source.max_image_megapixels) for i in ids]
    return np.stack(canvases) if canvases else _no_canvases(source)


def _no_canvases(source: ScoringSource) -> np.ndarray:
    return np.zeros((0, source.image_size, source.image_size), dtype=np.uint8)


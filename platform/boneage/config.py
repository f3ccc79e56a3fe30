"""One typed configuration for every job: dataclasses per area, loaded from YAML, overridden with ``--set``.

Each job reads ``--config configs/<job>.yaml`` and any number of ``--set area.key=value`` overrides. Values are
parsed as YAML (so ``--set model.head=[512,128]`` gives a list) and then checked against the field's type and
bounds. Every problem (unknown key, wrong type, value out of range, choice not offered) raises
:class:`ConfigError` naming the key and what is allowed, before any work starts.

A config file may build on another with ``include: <file>`` (relative to the including file): the included
file's settings come first and the including file's replace them key by key.

Each setting also says what it is to the rest of the platform, as :class:`Role` flags on the field: whether it
is part of the prepared dataset's fingerprint, of a run's or sweep's derived name, and whether a sweep may search
it. :func:`keys_with` and :func:`values_with` read them; no other module keeps a list of keys.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from boneage.artifacts import sha256_json
from boneage.errors import JobError


class ConfigError(JobError, ValueError):
    """A configuration key or value that cannot be used; the message names the key and what is allowed."""


class Role(enum.Flag):
    """What a setting is to the rest of the platform, beside its value. Read with :func:`keys_with` and
    :func:`values_with`; the areas in :data:`DECIDED_ROLES` must give every field's roles (``Role.NONE`` too)."""

    NONE = 0
    FINGERPRINT = enum.auto()  # changes the prepared rows: part of the prepared dataset's fingerprint (data)
    # May change what a run learns (or, in tune, what a sweep tries): part of the derived run name (model, augment,
    # train) and sweep name (those and tune). Settings that change only how a run executes are not.
    RUN_NAME = enum.auto()
    SEARCHABLE = enum.auto()  # a sweep may search it (tune.search_space)


# The roles each area must decide for every one of its fields: forgetting one fails tests/code/test_config.py.
DECIDED_ROLES = {"data": Role.FINGERPRINT, "model": Role.RUN_NAME, "augment": Role.RUN_NAME,
                 "train": Role.RUN_NAME, "tune": Role.RUN_NAME}
RUN_AREAS = ("model", "augment", "train")  # the areas a training run's name covers, beside its data
SWEEP_AREAS = (*RUN_AREAS, "tune")
INCLUDE = "include"  # the config file key naming a file to build on


def setting(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
            factory: Any = dataclasses.MISSING, doc: str = "", roles: Role | None = None) -> Any:
    """A dataclass field with inclusive numeric bounds (``low``/``high``), a one-line description and its
    :class:`Role` flags (None: not given, which only areas outside :data:`DECIDED_ROLES` may leave)."""
    meta = {"low": low, "high": high, "doc": doc, "roles": roles}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the raw labels and images are, and how ``jobs/prepare.py`` turns them into Parquet."""

    labels: str = setting("outputs/phantoms/boneage-training-dataset.csv",
                          roles=Role.FINGERPRINT, doc="labels file (.csv or .xlsx) in one of the RSNA layouts")
    images: str = setting("outputs/phantoms",
                          roles=Role.FINGERPRINT, doc="folder searched recursively for <id>.png/.jpg/.dcm")
    out: str = setting("outputs/prepared/phantoms", roles=Role.NONE, doc="prepared dataset folder")
    test_labels: Optional[str] = setting(None, roles=Role.FINGERPRINT,
                                         doc="external test labels; replaces the test split drawn from labels")
    test_images: Optional[str] = setting(None, roles=Role.FINGERPRINT,
                                         doc="image folder for test_labels (default: data.images)")
    image_size: int = setting(256, low=32, high=2048,
                              roles=Role.FINGERPRINT, doc="side of the square canvas, pixels; a multiple of 32")
    val_fraction: float = setting(0.15, low=0.0, high=0.9,
                                  roles=Role.FINGERPRINT, doc="share of each sex/age stratum for validation")
    test_fraction: float = setting(0.15, low=0.0, high=0.9,
                                   roles=Role.FINGERPRINT, doc="share for test (ignored with test_labels)")
    age_band_months: int = setting(24, low=1, high=240,
                                   roles=Role.FINGERPRINT, doc="width of the age bands used to stratify splits")
    max_reject_fraction: float = setting(0.01, low=0.0, high=1.0,
                                         roles=Role.NONE, doc="fail if more rows than this are rejected")
    max_image_megapixels: float = setting(64.0, low=0.01, high=1000.0,
                                          roles=Role.FINGERPRINT, doc="decompression-bomb guard")
    decode_batch_size: int = setting(1024, low=1, high=65536, roles=Role.NONE,
                                     doc="most images per decode task (and per Parquet file); lower for big images")

    def validate(self) -> None:
        if self.image_size % 32:  # refused here, not in a decode task or the model: VGG16 has five max-pools
            below = self.image_size // 32 * 32  # >= 32: the bounds are checked first
            raise ConfigError(f"data.image_size={self.image_size} must be a multiple of 32 (VGG16 halves the image "
                              f"five times): use {below} or {below + 32}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g} "
                              "must be below 1, to leave rows for training")


@dataclass
class PhantomConfig:
    """The synthetic hand-radiograph generator (``jobs/make_phantoms.py``)."""

    out: str = setting("outputs/phantoms", doc="output folder (Kaggle layout)")
    n: int = setting(2000, low=1, high=1_000_000, doc="number of images")
    seed: int = setting(0, low=0, doc="random seed; the same seed gives the same images")
    size: int = setting(256, low=64, high=2048, doc="image height in pixels (width is 0.8x)")
    label_noise_sd: float = setting(6.0, low=0.0, high=60.0, doc="rater-like label noise, months")
    workers: int = setting(0, low=0, high=256, doc="processes; 0 means one per CPU")
    dicom_examples: int = setting(0, low=0, high=1_000_000, doc="also write the first N phantoms as DICOM files")
    dicom_out: str = setting("outputs/phantom-dicom", doc="where the DICOM copies go (outside out: the loader "
                                                          "would see two files per id)")


@dataclass
class ModelConfig:
    """The VGG16 bone-age regressor."""

    arch: Literal["vgg16", "vgg16_bn"] = setting("vgg16_bn",
                                                 roles=Role.RUN_NAME | Role.SEARCHABLE, doc="torchvision backbone")
    weights: str = setting("none", roles=Role.RUN_NAME | Role.SEARCHABLE,
                           doc="'imagenet' (torch hub cache), 'none' (random), or a VGG16 state-dict file")
    pooling: Literal["flatten", "avg", "max"] = setting("avg", roles=Role.RUN_NAME | Role.SEARCHABLE,
                                                        doc="conv features to a vector (flatten: all)")
    head: list[int] = setting(factory=lambda: [512, 128], low=1, high=65536,
                              roles=Role.RUN_NAME | Role.SEARCHABLE, doc="hidden layer sizes of the regression head")
    dropout: float = setting(0.3, low=0.0, high=0.95,
                             roles=Role.RUN_NAME | Role.SEARCHABLE, doc="dropout before each head layer")
    sex_embedding: int = setting(16, low=1, high=1024, roles=Role.RUN_NAME | Role.SEARCHABLE,
                                 doc="width of the sex embedding joined to the features")


@dataclass
class AugmentConfig:
    """Random training augmentations, named and meant as Keras ImageDataGenerator's; applied on the device."""

    rotation_range: float = setting(5.0, low=0.0, high=180.0,
                                    roles=Role.RUN_NAME | Role.SEARCHABLE, doc="degrees, either way")
    width_shift_range: float = setting(0.15, low=0.0, high=1.0,
                                       roles=Role.RUN_NAME | Role.SEARCHABLE, doc="fraction of the width, either way")
    height_shift_range: float = setting(0.15, low=0.0, high=1.0, roles=Role.RUN_NAME | Role.SEARCHABLE,
                                        doc="fraction of the height, either way")
    brightness_range: list[float] = setting(factory=lambda: [0.9, 1.1], low=0.0, high=10.0,
                                            roles=Role.RUN_NAME, doc="[low, high] factor multiplying the pixel values")
    zoom_range: float = setting(0.25, low=0.0, high=0.95,
                                roles=Role.RUN_NAME | Role.SEARCHABLE, doc="zoom factor in [1 - z, 1 + z], as in Keras")
    horizontal_flip: bool = setting(True, roles=Role.RUN_NAME | Role.SEARCHABLE, doc="mirror half of the images")
    fill_mode: Literal["nearest", "constant", "reflect"] = setting("nearest", roles=Role.RUN_NAME,
                                                                   doc="pixels shifted in from outside")
    # The preview settings change nothing a run learns, but run names have hashed them from the start: they keep
    # the role so that a resubmitted job still finds the run it started before settings had roles.
    preview_path: str = setting("outputs/augment-preview.png",
                                roles=Role.RUN_NAME, doc="where jobs/preview_augment.py writes its grid")
    preview_images: int = setting(8, low=1, high=64,
                                  roles=Role.RUN_NAME, doc="training images shown in the preview grid")

    def validate(self) -> None:
        low_high = self.brightness_range
        if len(low_high) != 2 or low_high[0] > low_high[1]:
            raise ConfigError(f"augment.brightness_range={low_high!r} must be [low, high] with low <= high")


@dataclass
class TrainConfig:
    """Ray Train fine-tuning."""

    epochs: int = setting(10, low=1, high=10_000, roles=Role.RUN_NAME)
    batch_size: int = setting(32, low=1, high=4096, roles=Role.RUN_NAME | Role.SEARCHABLE, doc="per worker")
    num_workers: int = setting(1, low=0, high=1024,
                               roles=Role.NONE, doc="Ray Train workers; 0 trains in the driver process")
    cpus_per_worker: float = setting(1.0, low=0.0, high=1024.0, roles=Role.NONE, doc="CPUs reserved per worker")
    threads_per_worker: int = setting(0, low=0, high=1024,
                                      roles=Role.NONE, doc="torch threads per worker (0: its reserved CPUs)")
    use_gpu: Literal["auto", True, False] = setting("auto",
                                                    roles=Role.NONE, doc="auto: use GPUs when the cluster has them")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = setting(
        "PACK", roles=Role.NONE, doc="how workers are placed on nodes (STRICT_SPREAD: one per node)")
    lr: float = setting(1e-3, low=1e-7, high=1.0,
                        roles=Role.RUN_NAME | Role.SEARCHABLE, doc="peak learning rate of the head")
    backbone_lr_scale: float = setting(1.0, low=0.0, high=1.0,
                                       roles=Role.RUN_NAME | Role.SEARCHABLE, doc="backbone learning rate = lr x this")
    weight_decay: float = setting(1e-4, low=0.0, high=1.0,
                                  roles=Role.RUN_NAME | Role.SEARCHABLE, doc="AdamW weight decay")
    warmup_epochs: float = setting(0.5, low=0.0, high=1000.0, roles=Role.RUN_NAME | Role.SEARCHABLE,
                                   doc="linear warm-up, then cosine decay to zero")
    grad_clip: float = setting(1.0, low=0.0, high=1e6, roles=Role.RUN_NAME, doc="max gradient norm (0: no clipping)")
    freeze_epochs: int = setting(0, low=0, high=10_000, roles=Role.RUN_NAME | Role.SEARCHABLE,
                                 doc="epochs training the head only, backbone frozen")
    unfreeze_blocks: int = setting(5, low=0, high=5, roles=Role.RUN_NAME | Role.SEARCHABLE,
                                   doc="after freeze_epochs, train the top K of 5 conv blocks")
    bn_recalibration_batches: int = setting(
        8, low=0, high=100_000, roles=Role.RUN_NAME,
        doc="before validating, re-estimate batch-norm statistics from the epoch's last N batches (0: off); steadies "
            "early val MAE")
    ema_epochs: float = setting(
        0.0, low=0.0, high=1000.0, roles=Role.RUN_NAME,
        doc="validate and keep a running average of the weights, with this time constant in epochs (0: off); "
            "steadies val MAE at high learning rates")
    prefetch_batches: int = setting(2, low=0, high=64,
                                    roles=Role.NONE, doc="batches Ray Data prepares ahead of the step")
    shuffle_buffer: int = setting(512, low=0, high=1_000_000,
                                  roles=Role.RUN_NAME, doc="rows in the local shuffle buffer (0: off)")
    cache_dataset: bool = setting(True, roles=Role.NONE,
                                  doc="keep the splits in Ray's object store across epochs instead of re-reading "
                                      "Parquet; turn off for data larger than the object store")
    precision: Literal["auto", "bf16", "fp32"] = setting(
        "auto", roles=Role.RUN_NAME,
        doc="auto: bf16 autocast on GPUs and on CPUs with bf16 instructions, where it trains faster (AMX: "
                    "2.4x; avx512_bf16 without AMX, e.g. AMD Zen 4: 2.0x), fp32 on other CPUs; see "
                    "boneage.precision and bench/results/precision.json")
    progress_seconds: float = setting(30.0, low=0.01, high=86_400.0, roles=Role.NONE,
                                      doc="a progress line within an epoch at least this often (images, img/s, "
                                          "time left)")
    compile: bool = setting(False, roles=Role.NONE,
                            doc="torch.compile the model: VGG16 at 224 px trains 1.35x faster on an H200 "
                                "(bench/results/gpu_train.json); the first epoch waits for the compiler")
    seed: int = setting(0, low=0, roles=Role.RUN_NAME | Role.SEARCHABLE,
                        doc="initial weights, shuffling and augmentations; searchable: an ensemble's members "
                            "differ more when they start from different weights")
    storage_path: str = setting("outputs/ray_results",
                                roles=Role.NONE, doc="local folder or URI (s3://, gs://); shared on clusters")
    run_name: str = setting("", roles=Role.NONE,
                            doc="Ray Train run name; empty: derived from the settings, so reruns resume")
    max_failures: int = setting(2, low=-1, high=1000,
                                roles=Role.NONE, doc="worker failures to recover from (-1: forever)")
    keep_checkpoints: int = setting(2, low=1, high=1000, roles=Role.NONE, doc="best checkpoints kept, by val MAE")

    def validate(self) -> None:
        if self.ema_epochs and not self.bn_recalibration_batches:
            raise ConfigError("train.ema_epochs needs train.bn_recalibration_batches > 0: the averaged weights "
                              "have no batch-norm statistics of their own")


@dataclass
class RegistryConfig:
    """Where trained model bundles are kept, as numbered versions per model name."""

    root: str = setting("outputs/registry", doc="registry folder")
    name: str = setting("boneage-vgg16", doc="model name: bundles go to <root>/<name>/<version>")


@dataclass
class TuneConfig:
    """Ray Tune sweeps over the training job (``jobs/tune.py``)."""

    search_space: dict = setting(factory=dict, roles=Role.RUN_NAME,
                                 doc="{area.key: {choice: [...]} | {uniform|loguniform: [lo, hi]}}")
    num_samples: int = setting(8, low=1, high=100_000, roles=Role.RUN_NAME, doc="trials drawn from the search space")
    max_epochs: int = setting(6, low=1, high=10_000, roles=Role.RUN_NAME,
                              doc="epochs of a trial that ASHA never stops")
    grace_period: int = setting(1, low=1, high=10_000,
                                roles=Role.RUN_NAME, doc="epochs every trial runs before ASHA may stop it")
    reduction_factor: int = setting(2, low=2, high=100,
                                    roles=Role.RUN_NAME, doc="ASHA keeps the best 1/factor at each rung")
    metric: str = setting("val_mae", roles=Role.RUN_NAME, doc="the reported metric to minimise")
    seed: int = setting(0, low=0,
                        roles=Role.RUN_NAME, doc="seed of the trial sampler: the same seed draws the same trials")
    sweep_name: str = setting("", roles=Role.NONE,
                              doc="empty: derived from the settings, so rerunning resumes the sweep")
    data_cpus: float = setting(1.0, low=0.0, high=1024.0,
                               roles=Role.NONE, doc="CPUs left free for Ray Data while trials run")
    scheduler: Literal["asha", "fifo"] = setting("asha", roles=Role.RUN_NAME,
                                                 doc="asha stops weak trials early; fifo runs all to the end")
    ensemble_size: int = setting(1, low=1, high=64, roles=Role.NONE,
                                 doc="export the best trials as ONE bundle answering their mean (issue 15); 1: the "
                                     "best trial alone. Rerunning a finished sweep with another size re-exports it")


@dataclass
class EnsembleConfig:
    """``jobs/ensemble.py``: registered bundles exported as one ensemble bundle."""

    members: list[str] = setting(factory=list, doc="bundle folders or registry references (<name>:<version>), the "
                                                   "best first: its network reads the out-of-distribution features")
    data: str = setting("", doc="prepared dataset the ensemble's signals are fitted on (its validation split); "
                                "empty: the one the members were trained on")


TtaChoice = Literal["none", "flip", "rotate", "flip+rotate"]  # the views of boneage.tta.VIEWS


@dataclass
class AnswerConfig:
    """How a bundle's answers are given, alike in the service and the bulk jobs (issue 15's trust signals)."""

    calibrate: bool = setting(True, doc="apply the bundle's bias correction (fitted on its validation split); "
                                        "false: the network's raw answers")
    interval_level: float = setting(0.9, low=0.5, high=0.99,
                                    doc="coverage of the prediction interval each answer carries (split conformal, "
                                        "per age band and sex of the answer)")
    tta: TtaChoice = setting("none", doc="test-time augmentation: average the answers over views of each image "
                                         "(flip: also mirrored; rotate: also turned by +/-5 degrees; flip+rotate: "
                                         "all six), one forward pass of V times the images (boneage.tta); none "
                                         "by default: on the thumbnails, rotate's 1.4% lower MAE costs 1.9-3.2x "
                                         "the latency (bench/results/tta.json)")
    reject_ood: bool = setting(True, doc="refuse images the bundle's out-of-distribution detector places above its "
                                         "threshold (not hand radiographs): 422 not_a_hand_radiograph from the "
                                         "service, a not_a_hand_radiograph row in the bulk jobs' rejects; false: "
                                         "answer them, each with its ood_score")


@dataclass
class ServeConfig(AnswerConfig):
    """The bone-age service: the ``args`` of the application in ``configs/serve.yaml``. Replicas, autoscaling, queue
    limits, host and port are Serve's own settings in the same file."""

    model_uri: str = setting("boneage-vgg16:best", doc="bundle folder or registry reference (<name>:best|latest|N)")
    registry_root: str = setting("outputs/registry", doc="registry folder for references")
    max_upload_mb: float = setting(32.0, low=0.01, high=4096.0, doc="larger request bodies answer 413")
    max_image_megapixels: float = setting(64.0, low=0.01, high=1000.0, doc="decompression-bomb guard")
    max_batch_size: int = setting(16, low=1, high=1024, doc="most images per batched prediction")
    batch_wait_timeout_s: float = setting(0.03, low=0.0, high=10.0, doc="how long a batch waits to fill")
    overlay_size: int = setting(384, low=32, high=4096, doc="side of the Grad-CAM overlay PNG, pixels")
    heatmap_cells: int = setting(16, low=1, high=256, doc="the raw heat map in JSON: cells per side")
    torch_threads: int = setting(0, low=0, high=1024, doc="torch threads per replica (0: its CPUs)")
    precision: Literal["auto", "bf16", "fp32"] = setting(
        "auto", doc="predictions in bf16 (auto: on GPUs and on CPUs with bf16 instructions, AMX or avx512_bf16, "
                    "where they run faster; fp32 on other CPUs); Grad-CAM heat maps are always fp32")
    explainer: str = setting("", doc="heat-map method of /v1/explain, a name in boneage.inference.EXPLAINERS (empty: "
                                     "DEFAULT_EXPLAINER, the one that finds the hand on phantoms)")
    auth: Literal["auto", "api_key", "none"] = setting(
        "auto", doc="api_key: every /v1 request needs a key (X-API-Key or Authorization: Bearer); auto: api_key when "
                    "the service listens on a non-loopback address, none on 127.0.0.1; none is refused there")
    api_key_env: str = setting("BONEAGE_API_KEY", doc="the environment variable of the replicas that holds the API "
                                                      "key (several: comma-separated, for rotation); keys never go "
                                                      "in config files")


@dataclass
class QueryConfig:
    """``jobs/query.py``: ask a running service about one radiograph."""

    url: str = setting("http://127.0.0.1:8000", doc="the service's address")
    file: str = setting("", doc="the radiograph (PNG, JPEG or DICOM)")
    sex: str = setting("", doc="M or F (may be empty for a DICOM file with PatientSex)")
    chronological_age_months: Optional[float] = setting(None, low=0.0, high=240.0, doc="for the G&P SDS")
    overlay_out: str = setting("", doc="also ask for the Grad-CAM overlay and write it to this PNG path")
    timeout_s: float = setting(60.0, low=0.1, high=3600.0, doc="per request")
    wait_s: float = setting(0.0, low=0.0, high=3600.0, doc="first wait this long for /healthz (a starting service)")
    api_key_env: str = setting("BONEAGE_API_KEY", doc="the environment variable holding the service's API key, "
                                                      "sent when set (never put the key itself in a config file)")


@dataclass
class ScoringConfig(AnswerConfig):
    """Bulk inference with a model bundle (``boneage.scoring``): which images, and how they are scored. The
    prediction and evaluation jobs share these settings, each in its own area (:attr:`AREA`)."""

    AREA: ClassVar[str] = "scoring"  # the area its keys live in, for messages

    bundle: str = setting("boneage-vgg16:best", doc="bundle folder or registry reference (<name>:best|latest|N) "
                                                    "in registry.root")
    labels: str = setting("", doc="labels file in an RSNA layout (kaggle-test's Case ID,Sex too); empty: score "
                                  "every image under images, sex from DICOM headers")
    images: str = setting("", doc="folder searched recursively for <id>.png/.jpg/.dcm")
    data: str = setting("", doc="a prepared dataset folder instead of labels/images")
    split: str = setting("test", doc="the split of data to score (train, val, test or unlabeled)")
    batch_size: int = setting(32, low=1, high=4096, doc="images per model call")
    actors: int = setting(0, low=0, high=1024,
                          doc="Ray Data actors, each with its own copy of the model (0: one per GPU, else per CPU)")
    use_gpu: Literal["auto", True, False] = setting("auto", doc="auto: GPU actors when the cluster has GPUs")
    max_image_megapixels: float = setting(64.0, low=0.01, high=1000.0, doc="decompression-bomb guard")


@dataclass
class PredictConfig(ScoringConfig):
    """``jobs/predict.py``: bone ages for many images at once, as a CSV."""

    AREA: ClassVar[str] = "predict"

    out: str = setting("outputs/predictions.csv", doc="predictions CSV; the rejects go beside it to "
                                                      "<stem>.rejects.csv")


@dataclass
class EvalConfig(ScoringConfig):
    """``jobs/evaluate.py``: score a labelled set and write metrics.json and report.html."""

    AREA: ClassVar[str] = "eval"

    out: str = setting("outputs/evaluation", doc="output folder (metrics.json, report.html, predictions)")
    bootstrap_resamples: int = setting(1000, low=10, high=1_000_000, doc="resamples of the MAE's 95% CI")
    seed: int = setting(0, low=0, doc="seed of the bootstrap: the same seed gives the same interval")
    gallery_cases: int = setting(3, low=0, high=100, doc="Grad-CAM cases shown per best, median and worst")
    boxes: str = setting("", doc="phantom boxes.csv for the localisation score; empty: <images>/boxes.csv, or the "
                                 "prepared data's source folder's, when present")


@dataclass
class Config:
    """Every area's settings; a job uses the areas it needs and saves the whole resolved config."""

    data: DataConfig = field(default_factory=DataConfig)
    phantoms: PhantomConfig = field(default_factory=PhantomConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_config_file(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_nested(raw, key.split("."), value)
    return _build(Config, raw, prefix="")


def parse_section(cls: type, raw: dict[str, Any], area: str) -> Any:
    """One area's dataclass from plain data (e.g. a model config stored in a bundle), validated like a file."""
    return _build(cls, raw, prefix=f"{area}.")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A whole :class:`Config` from plain data, e.g. :func:`to_dict`'s output shipped to a Ray worker."""
    return _build(Config, raw, prefix="")


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with ``{"area.key": value}`` set, validated like ``--set``."""
    raw = to_dict(cfg)
    for key, value in values.items():
        _set_nested(raw, key.split("."), value)
    return config_from_dict(raw)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready data."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (every key, defaults included) so a run can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def keys_with(role: Role, cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys (``area.key``) of every setting that carries ``role``, in declaration order."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += keys_with(role, hints[f.name], prefix=f"{prefix}{f.name}.")
        elif role in (f.metadata.get("roles") or Role.NONE):
            keys.append(f"{prefix}{f.name}")
    return tuple(keys)


def values_with(role: Role, area: Any) -> dict[str, Any]:
    """``{key: value}`` (plain data) of the settings in one area's dataclass that carry ``role``."""
    values = to_dict(area)
    return {f.name: values[f.name] for f in dataclasses.fields(area) if role in (f.metadata.get("roles") or Role.NONE)}


def settings_fingerprint(cfg: Config, data_fingerprint: str, areas: tuple[str, ...] = RUN_AREAS) -> str:
    """A hash of the prepared data and the :attr:`Role.RUN_NAME` settings of ``areas``: what a run learns
    (:data:`RUN_AREAS`) or a sweep tries (:data:`SWEEP_AREAS`)."""
    return sha256_json({"data": data_fingerprint,
                        **{area: values_with(Role.RUN_NAME, getattr(cfg, area)) for area in areas}})


def derived_name(cfg: Config, data_fingerprint: str, sweep: bool = False) -> str:
    """The name of a training run, ``<registry.name>-<hash>``, or with ``sweep`` of a sweep,
    ``sweep-<registry.name>-<hash>``: fixed by the data and the settings that may change what is learned (and, for
    a sweep, tried), so resubmitting the same job finds and resumes its own run, and a changed setting starts a
    new one."""
    areas, prefix = (SWEEP_AREAS, "sweep-") if sweep else (RUN_AREAS, "")
    return f"{prefix}{cfg.registry.name}-{settings_fingerprint(cfg, data_fingerprint, areas)[:10]}"


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key: ``area.key  type  default  bounds  description`` (for README and ``--help``)."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            lines += describe(hint, prefix=f"{key}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"{key} ({_type_name(hint)}{_bounds_text(f)}, default {default!r}): {f.metadata.get('doc', '')}")
    return lines


def _read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's areas, on top of those of the file its ``include:`` names (followed recursively)."""
    raw = _read_yaml(path, included_by=chain[-1] if chain else None)
    if INCLUDE not in raw:
        return raw
    name = raw.pop(INCLUDE)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config file {path}: include must name one file, got {name!r}")
    base = path.parent / name
    here = (*chain, path.resolve())
    if base.resolve() in here:
        raise ConfigError(f"config file {path}: include: {name} makes a cycle "
                          f"({' -> '.join(p.name for p in (*here, base.resolve()))})")
    return _merge_areas(_read_config_file(base, here), raw)


def _merge_areas(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, key by key within each area (a key's value, e.g. a search space, is replaced whole)."""
    merged = dict(base)
    for area, values in top.items():
        below = merged.get(area)
        merged[area] = {**below, **values} if isinstance(below, dict) and isinstance(values, dict) else values
    return merged


def _read_yaml(path: Path, included_by: Path | None = None) -> dict[str, Any]:
    if not path.is_file():
        where = f" (included by {included_by})" if included_by else ""
        raise ConfigError(f"config file {path}{where} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of areas, got {type(raw).__name__}")
    return raw


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like area.key=value, e.g. data.image_size=256")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the literal text and let the field's type decide
    return key.strip(), value


def _set_nested(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(parts)}: {part} is not an area")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys in {where}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix=f"{key}.")
        else:
            kwargs[name] = _check_bounds(key, _coerce(key, value, hint), fields[name])
    built = cls(**kwargs)
    if hasattr(built, "validate"):
        built.validate()  # rules across keys, e.g. a [low, high] pair
    return built


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` as type ``hint`` or raise naming ``key`` and the expected type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not a valid choice; choose one of: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value  # its entries are checked by the area that reads them
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_type_name(args[0])}, e.g. [512, 128]; got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _check_bounds(key: str, value: Any, f: dataclasses.Field) -> Any:
    low, high = f.metadata.get("low"), f.metadata.get("high")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (low is not None and v < low) or (high is not None and v > high):
                raise ConfigError(f"{key}={value!r} is out of range; allowed{_bounds_text(f)}")
    return value


def _bounds_text(f: dataclasses.Field) -> str:
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if low is None and high is None:
        return ""
    if high is None:
        return f" >= {low:g}"
    if low is None:
        return f" <= {high:g}"
    return f" {low:g}..{high:g}"


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if hint is dict or origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "text"}.get(hint, str(hint))

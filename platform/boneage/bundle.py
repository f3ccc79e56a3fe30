"""Model bundles: a trained model as a self-describing folder, and a registry of numbered versions.

A bundle folder holds ``model.pt`` (a state dict, loaded with ``torch.load(weights_only=True)``) and
``bundle.json`` (:class:`BundleMeta`): the model config, image size and preprocessing, the target's mean and SD,
training and validation metrics, the prepared data's manifest hash, the code version, the creation time and the
SHA-256 of ``model.pt``, which :func:`load_bundle` checks before loading. Loading needs only this library, not Ray.
Two optional parts (issue 15), each with its checksum in ``bundle.json``: ``ood.npz``, the out-of-distribution
detector (:class:`~boneage.ood.OodDetector`, plain arrays), and for an ensemble ``member-<i>.pt``, the weights of
its members after the first (:class:`EnsembleMember`; the first member is ``model.pt``).

The registry keeps bundles as ``<root>/<name>/<version>/`` (1, 2, 3, ...) and a ``best`` alias
(``<root>/<name>/best.json``): the version with the lowest validation MAE, moved only by a bundle that beats it on
the same validation split. A reference is a bundle folder, or ``<name>:<version>``, ``<name>:latest`` or
``<name>:best`` resolved in the registry.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch

from boneage.artifacts import (code_version, disk_full_reported, save_torch, sha256_file, temporary_sibling,
                               write_json)
from boneage.config import ModelConfig, parse_section, to_dict
from boneage.errors import JobError
from boneage.model import BoneAgeNet
from boneage.ood import OOD_FILE, OodDetector
from boneage.trust import TrustSignals

# The bundle.json layout this code writes, and those it reads. A new field with a default needs no new format (older
# code ignores it, this code reads older bundles with the default); renaming, removing or re-meaning one does.
# Format 2 added the trust signals, the OOD detector and ensembles (issue 15): a format-1 bundle loads without them
# and says so.
BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)
WEIGHTS = "model.pt"
META = "bundle.json"
BEST = "best.json"


class BundleError(JobError, ValueError):
    """A bundle that is missing, incomplete, or whose weights do not match their recorded checksum."""


@dataclass
class TargetScale:
    """How the target was standardised for training: the model answers (months - mean) / std."""

    mean: float
    std: float


@dataclass
class DataSource:
    """The prepared data a bundle was trained and validated on."""

    manifest_fingerprint: str  # bundles validated on the same split (same manifest) can be compared
    prepared: str = ""  # the prepared dataset's folder


@dataclass
class EnsembleMember:
    """One model of an ensemble bundle: where its weights are and what it is."""

    model: ModelConfig
    weights: str  # its state dict's file in the bundle: model.pt for the first member, member-<i>.pt for the others
    weights_sha256: str
    val_mae: float  # its own, on the bundle's validation split
    run: str = ""  # the training run (a sweep's trial) it came from
    train: dict[str, Any] = field(default_factory=dict)  # its training settings, as trained

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EnsembleMember:
        """A member from its ``bundle.json`` entry."""
        return cls(**{**values, "model": parse_section(ModelConfig, values["model"], "model")})


@dataclass
class BundleMeta:
    """``bundle.json``, typed: what a bundle says about its model. Every field after ``data`` has a default, so a
    field added later loads from bundles written before it existed."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("name", "model", "image_size", "target", "data")

    name: str  # the registry name it was trained for
    model: ModelConfig
    image_size: int
    target: TargetScale
    data: DataSource
    metrics: dict[str, float] = field(default_factory=dict)  # the exported epoch's, and val_mae_mean_baseline
    run: str = ""  # the training run (Ray Train) it came from
    checkpoint: str = ""  # that run's checkpoint folder
    preprocessing: dict[str, Any] = field(default_factory=dict)  # the manifest's: how images were decoded, resized
    train: dict[str, Any] = field(default_factory=dict)  # the training settings, as trained
    augment: dict[str, Any] = field(default_factory=dict)  # the augmentation settings, as trained
    weights_sha256: str = ""  # of model.pt; written by write_bundle, checked by read_meta
    code_version: dict[str, Any] = field(default_factory=dict)
    created: str = ""  # ISO 8601, UTC
    trust: TrustSignals | None = None  # bias correction and intervals; None in bundles written before format 2
    ood_sha256: str = ""  # of ood.npz, the out-of-distribution detector; "" when the bundle has none
    members: list[EnsembleMember] = field(default_factory=list)  # an ensemble's models, the first is model.pt; a
    # single model has none. An ensemble answers the mean of its members; its metrics are the ensemble's.
    format: int = BUNDLE_FORMAT

    @property
    def val_mae(self) -> float:
        """The validation MAE in months that ranks bundles for ``best``."""
        return self.metrics["val_mae"]

    def save(self, folder: str | Path) -> Path:
        """Write ``bundle.json`` into ``folder`` (atomically), in this code's format."""
        return write_json(Path(folder) / META, {**to_dict(self), "format": BUNDLE_FORMAT})

    @classmethod
    def load(cls, folder: str | Path) -> BundleMeta:
        """Read ``bundle.json`` of ``folder``; :class:`BundleError` for another format or a missing field. Keys this
        code does not know (fields a newer writer added) are ignored. Does not check the weights: see
        :func:`read_meta`."""
        path = Path(folder) / META
        values = json.loads(path.read_text())
        if values.get("format") not in READABLE_FORMATS:
            raise BundleError(f"{path} is bundle format {values.get('format')}; this code reads formats "
                              f"{', '.join(map(str, READABLE_FORMATS))}: load it with the version of boneage that "
                              "wrote it, or re-export it")
        missing = [key for key in cls.REQUIRED if key not in values]
        if missing:
            raise BundleError(f"{path} lacks {', '.join(missing)}: it is not a complete bundle description")
        known = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        trust = TrustSignals.from_dict(values["trust"]) if values.get("trust") else None
        return cls(**{**known, "model": parse_section(ModelConfig, values["model"], "model"),
                      "target": TargetScale(**values["target"]), "data": DataSource(**values["data"]),
                      "trust": trust, "members": [EnsembleMember.from_dict(m) for m in values.get("members", [])]})

    def weight_files(self) -> dict[str, str]:
        """Every state dict file of the bundle and its recorded checksum: ``model.pt``, and an ensemble's other
        members'."""
        return {WEIGHTS: self.weights_sha256, **{m.weights: m.weights_sha256 for m in self.members}}

    def member_models(self) -> list[ModelConfig]:
        """The model config of each member, ``model.pt``'s first; one for a single model."""
        return [m.model for m in self.members] or [self.model]


@dataclass
class LoadedBundle:
    """A model ready for inference (eval mode, on CPU) and its metadata: an ensemble's members, and the
    out-of-distribution detector when the bundle has one."""

    model: BoneAgeNet  # model.pt: the single model, or an ensemble's first member (the OOD detector reads it)
    meta: BundleMeta
    path: Path
    members: list[BoneAgeNet] = field(default_factory=list)  # every model, ``model`` first ([model] if single)
    ood: OodDetector | None = None

    def __post_init__(self) -> None:
        self.members = self.members or [self.model]

    def to_months(self, standardised: torch.Tensor) -> torch.Tensor:
        """Model output -> bone age in months."""
        return standardised * self.meta.target.std + self.meta.target.mean


def write_bundle(folder: Path, state_dict: dict[str, torch.Tensor], meta: BundleMeta) -> Path:
    """Write ``model.pt`` and ``bundle.json`` (with the weights' checksum and provenance) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_torch(state_dict, folder / WEIGHTS)
    dataclasses.replace(meta, weights_sha256=sha256_file(folder / WEIGHTS), **_provenance()).save(folder)
    return folder


def write_ensemble(folder: Path, members: list[Path]) -> Path:
    """Write the bundles ``members`` (the best first) as one ensemble bundle into ``folder``: their weights
    (``model.pt``, ``member-1.pt``, ...) and a ``bundle.json`` whose ``members`` describe them. They must answer
    alike (same image size, target scale and validation data). The ensemble's own val MAE, trust signals and
    detector are left to its export to measure (:func:`boneage.ensemble.export_ensemble`)."""
    metas = [read_meta(member) for member in members]
    _check_ensemble(members, metas)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (source, meta) in enumerate(zip(members, metas)):
        weights = WEIGHTS if index == 0 else f"member-{index}.pt"
        shutil.copyfile(source / WEIGHTS, folder / weights)
        entries.append(EnsembleMember(meta.model, weights, meta.weights_sha256, meta.val_mae, meta.run, meta.train))
    baseline = {k: v for k, v in metas[0].metrics.items() if k == "val_mae_mean_baseline"}
    dataclasses.replace(metas[0], members=entries, metrics=baseline, trust=None, ood_sha256="", run="",
                        checkpoint="", **_provenance()).save(folder)
    return folder


def _check_ensemble(members: list[Path], metas: list[BundleMeta]) -> None:
    """Members must be single models that read the same canvases, answer on the same scale and were chosen on the
    same validation split; :class:`BundleError` names the first that does not."""
    if len(members) < 2:
        raise BundleError(f"an ensemble needs at least 2 members, got {len(members)}")
    first = metas[0]
    for path, meta in zip(members, metas):
        if meta.members:
            raise BundleError(f"{path} is an ensemble already: list its members' bundles instead")
        for what, mine, theirs in (("image size", meta.image_size, first.image_size),
                                   ("target scale", meta.target, first.target),
                                   ("prepared data (manifest)", meta.data.manifest_fingerprint,
                                    first.data.manifest_fingerprint)):
            if mine != theirs:
                raise BundleError(f"{path} differs from {members[0]} in its {what} ({mine} against {theirs}): "
                                  "an ensemble's members must be trained on the same prepared data")


def _provenance() -> dict[str, Any]:
    """The code version and creation time every written bundle records."""
    return {"code_version": code_version(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def read_meta(path: str | Path) -> BundleMeta:
    """``bundle.json`` of a bundle folder, after checking that every file it records (``model.pt``, an ensemble's
    members, ``ood.npz``) matches its recorded checksum."""
    folder = Path(path)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise BundleError(f"{folder} is not a model bundle: it needs {WEIGHTS} and {META}")
    meta = BundleMeta.load(folder)
    recorded = {**meta.weight_files(), **({OOD_FILE: meta.ood_sha256} if meta.ood_sha256 else {})}
    for name, expected in recorded.items():
        if not (folder / name).is_file():
            raise BundleError(f"{folder} lacks {name}, which its {META} records: the bundle is incomplete")
        actual = sha256_file(folder / name)
        if actual != expected:
            raise BundleError(f"{folder / name} does not match the checksum in {META} (expected "
                              f"{expected}, found {actual}): the bundle was modified or damaged")
    return meta


def load_bundle(path: str | Path) -> LoadedBundle:
    """Verify and load a bundle (every member of an ensemble, and its OOD detector) into eval-mode models on the
    CPU."""
    folder = Path(path)
    meta = read_meta(folder)
    files = [WEIGHTS] if not meta.members else [m.weights for m in meta.members]
    members = [_load_weights(folder / name, cfg, meta.image_size) for name, cfg in zip(files, meta.member_models())]
    ood = OodDetector.load(folder) if meta.ood_sha256 else None
    return LoadedBundle(model=members[0], meta=meta, path=folder, members=members, ood=ood)


def _load_weights(path: Path, cfg: ModelConfig, image_size: int) -> BoneAgeNet:
    """An eval-mode network of ``cfg`` holding the state dict at ``path``."""
    model_cfg = dataclasses.replace(cfg, weights="none")  # the bundle's weights, not pretrained ones
    with torch.device("meta"):  # no random initialisation, which the bundle's weights replace (1.5 s of VGG16's)
        model = BoneAgeNet(model_cfg, image_size)
    state = torch.load(path, map_location="cpu", weights_only=True)
    mismatch = weights_mismatch(model.state_dict(), state)
    if mismatch:
        raise BundleError(f"{path} does not fit the model {META} describes ({model_cfg.arch}, head "
                          f"{model_cfg.head}, {image_size} px): {mismatch}; re-export the bundle from its "
                          "training run, or serve another one")
    model.load_state_dict(state, assign=True)  # the loaded tensors become the parameters
    return model.eval()


def weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """Why a state dict does not fit a model, in a few words ("" when it fits); torch's own error lists every
    tensor over dozens of lines."""
    if _backbone(found) != _backbone(expected):
        return f"it holds {_backbone(found)} weights"
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    resized = [key for key in expected if key in found and expected[key].shape != found[key].shape]
    if resized:
        key = resized[0]
        return (f"{len(resized)} tensors differ in shape, e.g. {key} is {list(found[key].shape)} there, "
                f"{list(expected[key].shape)} here")
    if missing or unexpected:
        return f"{len(missing)} tensors missing {missing[:1]}, {len(unexpected)} unexpected {unexpected[:1]}"
    return ""


def _backbone(state: dict[str, torch.Tensor]) -> str:
    """Which VGG16 a state dict is for: only vgg16_bn has batch-norm statistics."""
    return "vgg16_bn" if any(key.endswith("running_mean") for key in state) else "vgg16"


@dataclass
class Promotion:
    """Whether a bundle became the ``best`` alias, and why (a sentence for the job log)."""

    promoted: bool
    message: str


def promote_if_better(version: Path, root: str | Path, name: str) -> Promotion:
    """Point ``<name>:best`` at a registered version if its val MAE beats the current best's on the same
    validation split (same prepared-data manifest). Atomic, and serialised against other promoters."""
    meta = read_meta(version)
    mae, data = meta.val_mae, meta.data.manifest_fingerprint
    with _locked(Path(root) / name):
        current = read_best(root, name)
        if current is not None and current["version"] == int(version.name):
            return Promotion(False, f"version {version.name} is already {name}:best (val MAE {mae:.2f})")
        if current is None:
            reason = "there was no best yet"
        elif current["manifest_fingerprint"] != data:
            return Promotion(False, f"{name}:best (version {current['version']}) was validated on other data "
                                    f"(manifest {current['manifest_fingerprint'][:12]}, this bundle's "
                                    f"{data[:12]}): not comparable, so best stays where it is")
        elif mae >= current["val_mae"]:
            return Promotion(False, f"version {version.name} (val MAE {mae:.2f}) does not beat {name}:best, "
                                    f"version {current['version']} (val MAE {current['val_mae']:.2f}): best stays")
        else:
            reason = f"it beats version {current['version']} (val MAE {current['val_mae']:.2f})"
        alias = Path(root) / name / BEST
        with disk_full_reported(f"the {name}:best alias", alias, f"{name}:best is untouched"):
            write_json(alias, {"version": int(version.name), "val_mae": mae, "manifest_fingerprint": data,
                               "promoted": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return Promotion(True, f"promoted version {version.name} (val MAE {mae:.2f}) to {name}:best: {reason}")


def read_best(root: str | Path, name: str) -> dict[str, Any] | None:
    """The ``best`` alias record of ``name`` (version, val MAE, data manifest), or None."""
    path = Path(root) / name / BEST
    return json.loads(path.read_text()) if path.is_file() else None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def register(bundle: Path, root: str | Path, name: str) -> Path:
    """Copy a bundle folder into the registry as the next version of ``name``; return the version folder. A copy
    that fails (a full disk: :class:`~boneage.artifacts.DiskFull`) leaves nothing behind.

    A bundle whose weights (all its members') are already registered under ``name`` is not copied again: its
    version is returned.
    Only the new bundle's weights are hashed; stored versions are compared by the checksums they recorded (each
    load checks its own), so registering costs the same however many versions there are.
    """
    meta = read_meta(bundle)
    models = Path(root) / name
    models.mkdir(parents=True, exist_ok=True)
    for version in versions(root, name):  # an ensemble is the same bundle only with the same members
        if BundleMeta.load(models / str(version)).weight_files() == meta.weight_files():
            return models / str(version)
    full = disk_full_reported(f"a new version of {name}", models, f"its versions and {name}:best are untouched")
    with full, temporary_sibling(models, ".incoming-") as staging:
        shutil.copytree(bundle, staging, dirs_exist_ok=True)
        return _next_version(staging, models)


def _next_version(staging: Path, models: Path) -> Path:
    """Rename the complete copy ``staging`` to the next free version number in ``models``; return that folder."""
    while True:  # another process may take a number first: rename fails, try the next one
        target = models / str(max(versions(models.parent, models.name), default=0) + 1)
        try:
            os.rename(staging, target)  # atomic: readers never see a half-copied version
            return target
        except OSError:
            if not target.exists():
                raise


@contextmanager
def staging_folder() -> Iterator[Path]:
    """A temporary folder to build a bundle in before :func:`register` copies it into the registry; removed
    afterwards. A full disk there is reported as such (:class:`~boneage.artifacts.DiskFull`)."""
    with tempfile.TemporaryDirectory(prefix="bundle-") as staging:
        with disk_full_reported("the model bundle", staging, "the registry is untouched"):
            yield Path(staging)


def reference(version: Path) -> str:
    """The registry reference of a registered version folder: ``<name>:<version>``."""
    return f"{version.parent.name}:{version.name}"


def versions(root: str | Path, name: str) -> list[int]:
    """The registered version numbers of ``name``, ascending."""
    folder = Path(root) / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def resolve(reference: str, root: str | Path) -> Path:
    """A bundle folder from a path or a registry reference ``<name>:<version>``, ``<name>:latest``, ``<name>:best``."""
    if Path(reference).is_dir():
        return Path(reference)
    name, sep, version = reference.rpartition(":")
    if not sep or not name:
        raise BundleError(f"{reference!r} is neither a bundle folder nor a registry reference like "
                          f"'<name>:<version>', '<name>:latest' or '<name>:best'")
    known = versions(root, name)
    if not known:
        raise BundleError(f"no model named {name!r} in the registry at {root}")
    if version == "latest":
        return Path(root) / name / str(known[-1])
    if version == "best":
        best = read_best(root, name)
        if best is None:
            raise BundleError(f"{name} has no best version yet: a training run or sweep promotes one")
        return Path(root) / name / str(best["version"])
    if not version.isdigit() or int(version) not in known:
        raise BundleError(f"{name} has no version {version!r}; registered: {', '.join(map(str, known))}, latest, "
                      "best")
    return Path(root) / name / version


def store_ood_detector(folder: Path, detector: OodDetector) -> None:
    """Write ``detector`` into the bundle at ``folder`` as ``ood.npz`` and record its checksum in ``bundle.json``."""
    path = detector.save(folder)
    dataclasses.replace(BundleMeta.load(folder), ood_sha256=sha256_file(path)).save(folder)

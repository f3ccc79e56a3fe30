"""Ensembles (issue 15): several trained bundles exported as ONE bundle, which answers the mean of its members.

A sweep's best trials differ in their settings and initial weights, so their errors partly cancel: Deeplasia
averages three models for that reason. ``jobs/tune.py`` exports its ``tune.ensemble_size`` best trials this way and
``jobs/ensemble.py`` does it for any registered bundles trained on the same prepared data. The ensemble bundle is
an ordinary bundle to everything that loads it (:mod:`boneage.bundle`): the service batches it like one model,
averages its members' Grad-CAM maps and reports the members' spread with each answer.

Its own signals are fitted as for any export (:func:`boneage.signals.attach_signals`): the bias correction and
intervals on the ensemble's answers, the out-of-distribution detector on its first (best) member's features. Its
val MAE, which ranks it for ``best``, is the ensemble's raw answers' on the same validation split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from boneage.bundle import (BundleError, Promotion, promote_if_better, read_meta, reference, register, resolve,
                            staging_folder, write_ensemble)
from boneage.config import Config
from boneage.signals import attach_signals

log = logging.getLogger(__name__)


@dataclass
class EnsembleOutcome:
    """What the ensemble job produced."""

    bundle: Path  # the registered ensemble version
    val_mae: float  # the ensemble's, on its members' validation split
    member_val_mae: list[float]  # each member's own, best first
    promotion: Promotion


def run_ensemble(cfg: Config) -> EnsembleOutcome:
    """Export ``ensemble.members`` (folders or registry references) as one registered ensemble bundle, and promote
    it to ``<registry.name>:best`` if it beats the current best on the same validation split."""
    root = cfg.registry.root
    members = [resolve(member, root) for member in cfg.ensemble.members]
    bundle = export_ensemble(members, cfg.ensemble.data, root, cfg.registry.name)
    meta = read_meta(bundle)
    return EnsembleOutcome(bundle, meta.val_mae, [m.val_mae for m in meta.members],
                           promote_if_better(bundle, root, cfg.registry.name))


def export_ensemble(members: list[Path], data: str, registry_root: str, name: str) -> Path:
    """Write the bundles ``members`` (best first) as one ensemble, fit its signals on the prepared ``data`` (empty:
    the members'), measure its val MAE and register it as the next version of ``name``."""
    with staging_folder() as staging:
        folder = write_ensemble(staging / "ensemble", members)
        prepared = data or read_meta(folder).data.prepared
        if not Path(prepared).is_dir():
            raise BundleError(f"the members' prepared data {prepared} is not on this machine: set ensemble.data to "
                              "a copy of it (the same prepared dataset)")
        log.info("ensemble of %d: %s", len(members), ", ".join(_name(m) for m in members))
        attach_signals(folder, prepared)
        _record_val_mae(folder)
        return register(folder, registry_root, name)


def _record_val_mae(folder: Path) -> None:
    """The ensemble's val MAE (its raw answers', as its members' were measured) into its ``bundle.json``."""
    meta = read_meta(folder)
    if meta.trust is None:
        raise BundleError(f"{meta.data.prepared} has no validation images: an ensemble is measured on them")
    meta.metrics = {**meta.metrics, "val_mae": meta.trust.val_raw.overall.mae}
    meta.save(folder)
    log.info("ensemble val MAE %.2f months; its members' %s", meta.val_mae,
             ", ".join(f"{m.val_mae:.2f}" for m in meta.members))


def _name(member: Path) -> str:
    """A member's registry reference when it is registered, else its folder."""
    return reference(member) if member.parent.name and member.name.isdigit() else str(member)

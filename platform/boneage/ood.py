"""Is this a hand radiograph? Out-of-distribution rejection by the Mahalanobis distance of backbone features.

The features are the model's own: the activations at the end of chosen backbone stages (by default all five,
``block1``..``block5``), each globally average-pooled and concatenated (64 + 128 + 256 + 512 + 512 = 1,472
numbers). Training
images' features define a Gaussian: each feature standardised by its training mean and SD, then a covariance
shrunk towards a multiple of the identity with Ledoit and Wolf's estimate (scikit-learn's ``LedoitWolf``; a few
thousand images against a thousand dimensions need the shrinkage to be invertible). An image's score is its
Mahalanobis distance from that mean; the threshold is the validation scores' split-conformal order statistic, so
that a new real hand is rejected with probability at most ``max_hand_rejection`` (1%).

Why all stages: the top block alone keeps only what helps reading age, and on the RSNA thumbnails model nearly
every non-hand (blank films, noise, text, photographs) lands among the hands there (2% rejected); the lower stages
keep the texture and contrast statistics that set them apart (99% rejected; ``bench/ood.py``). A mirrored hand
(a right hand) is accepted, not rejected: a model trained with horizontal flips reads it as well as a left one
(phantoms: MAE 14.4 against 14.5 months), so :meth:`OodDetector.fit_on_images` adds the mirrored training images'
features to the fit. An inverted (negative) film is rejected: nothing in training looks like it.

Serving reads the features from the forward pass that answers (:class:`FeatureTap`: hooks that keep each stage's
pooled activation), so rejection costs no second pass; the detector is fitted on features computed the same way
(the predictor's precision and memory format), so training and serving cannot drift apart.

A detector is stored in a bundle as ONE file, ``ood.npz``: numpy arrays only, read with ``allow_pickle=False``
(bundles are untrusted files, and a pickle runs code when loaded).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from boneage.artifacts import atomic_file
from boneage.errors import JobError
from boneage.model import BoneAgeNet
from boneage.trust import conformal_rank

OOD_FILE = "ood.npz"
METHOD = "mahalanobis-ledoit-wolf"
DEFAULT_STAGES = ("block1", "block2", "block3", "block4", "block5")
SCALE_FLOOR = 0.1  # of the median feature SD


class OodFileError(JobError, ValueError):
    """``ood.npz`` is missing, damaged, or holds something other than plain arrays."""


FeaturesOf = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (canvases (N, S, S) uint8, male (N,)) -> (N, D)


class FeatureTap:
    """The detector's features, read off a network's own forward passes: hooks on the last activation of
    ``stages`` keep each one averaged over space, for the thread inside :meth:`collect` only (a replica answers
    from several threads; the hooks stay on, costing nothing to a thread that is not collecting)."""

    def __init__(self, net: BoneAgeNet, stages: tuple[str, ...] = DEFAULT_STAGES):
        self._local = threading.local()
        layers = [next(s.activation for s in net.stages if s.name == name) for name in stages]
        self._hooks = [net.get_submodule(layer).register_forward_hook(self._keep) for layer in layers]

    def _keep(self, _module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        sink = getattr(self._local, "sink", None)
        if sink is not None:
            sink.append(output.float().mean(dim=(2, 3)))  # (B, C): stages run bottom to top, so in their order

    @contextmanager
    def collect(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, this thread's forward passes append each tapped stage's (B, C) pooled activation."""
        self._local.sink = sink = []
        try:
            yield sink
        finally:
            self._local.sink = None

    @staticmethod
    def features(collected: list[torch.Tensor], rows: int) -> np.ndarray:
        """One forward pass's collected activations -> (rows, D) float32: the first ``rows`` images (the
        unaugmented view when test-time augmentation stacked several)."""
        return torch.cat([stage[:rows] for stage in collected], dim=1).cpu().numpy().astype(np.float32)

    def __deepcopy__(self, memo: dict) -> FeatureTap:
        # A copied network (Grad-CAM's private copy) keeps its hooks, and with them this tap, shared: a thread-local
        # cannot be copied, and the copy's passes are collected only inside this tap's collect() on the same thread.
        return self

    def remove(self) -> None:
        """Take the hooks off the network."""
        for hook in self._hooks:
            hook.remove()


def pooled_features(net: BoneAgeNet, canvases: np.ndarray, male: np.ndarray, device: str = "cpu",
                    batch_size: int = 64, stages: tuple[str, ...] = DEFAULT_STAGES) -> np.ndarray:
    """The features the detector reads: ``canvases`` (N, S, S) uint8 and ``male`` (N,) bool -> (N, D) float32,
    each of ``stages``' last activation averaged over space, concatenated bottom to top, in fp32.

    The model's own forward pass computes them, so its pixel convention applies as it is. (A predictor computes
    them in its own precision: :meth:`boneage.inference.BoneAgePredictor.features`.)
    """
    tap, batches = FeatureTap(net, stages), []
    try:
        with torch.inference_mode():
            for start in range(0, len(canvases), batch_size):
                image = torch.from_numpy(np.ascontiguousarray(canvases[start:start + batch_size])).unsqueeze(1)
                sex = torch.from_numpy(np.asarray(male[start:start + batch_size], dtype=np.float32))
                with tap.collect() as collected:
                    net(image.to(device), sex.to(device))
                batches.append(tap.features(collected, len(image)))
    finally:
        tap.remove()
    return np.concatenate(batches) if batches else np.zeros((0, 0), np.float32)


@dataclass
class OodDetector:
    """A fitted Mahalanobis detector: what ``ood.npz`` stores."""

    stages: tuple[str, ...]  # the backbone stages whose pooled activations are the features
    mean: np.ndarray  # (D,) the training features' mean
    scale: np.ndarray  # (D,) their SD (standardisation before the covariance)
    precision: np.ndarray  # (D, D) inverse of the shrunk covariance of the standardised features
    threshold: float  # scores above it are rejected
    val_rejection: float  # share of validation hands above the threshold
    max_hand_rejection: float  # what the threshold was set for
    method: str = METHOD

    @classmethod
    def fit(cls, train_features: np.ndarray, val_features: np.ndarray, max_hand_rejection: float = 0.01,
            stages: tuple[str, ...] = DEFAULT_STAGES) -> OodDetector:
        """Fit the Gaussian on ``train_features`` and set the threshold on ``val_features`` so that at most
        ``max_hand_rejection`` of them score above it."""
        from sklearn.covariance import LedoitWolf  # here: only exporting a bundle fits one

        mean = train_features.mean(axis=0)
        spread = train_features.std(axis=0)
        # A floor: a near-constant channel (a dead ReLU) would otherwise turn its rounding noise into huge distances
        scale = np.maximum(spread, SCALE_FLOOR * max(float(np.median(spread)), 1e-12))
        estimate = LedoitWolf(assume_centered=True).fit((train_features - mean) / scale)
        detector = cls(tuple(stages), mean.astype(np.float32), scale.astype(np.float32),
                       estimate.precision_.astype(np.float32), threshold=np.inf, val_rejection=0.0,
                       max_hand_rejection=max_hand_rejection)
        val_scores = np.sort(detector.scores(val_features))
        # Split conformal's order statistic, as for the intervals: a NEW hand like the validation ones scores above
        # it with probability at most max_hand_rejection (the plain quantile promises that only for the validation
        # hands themselves). With too few validation hands for the rank, their highest score.
        rank = conformal_rank(len(val_scores), 1.0 - max_hand_rejection)
        detector.threshold = float(val_scores[min(rank, len(val_scores)) - 1])
        detector.val_rejection = float(np.mean(val_scores > detector.threshold))
        return detector

    @classmethod
    def fit_on_images(cls, features_of: FeaturesOf, train: tuple[np.ndarray, np.ndarray],
                      val: tuple[np.ndarray, np.ndarray], mirrored: bool, max_hand_rejection: float = 0.01,
                      stages: tuple[str, ...] = DEFAULT_STAGES) -> OodDetector:
        """:meth:`fit` on the features ``features_of`` computes (of ``stages``) for ``train`` and ``val`` (each
        canvases (N, S, S) uint8 and male (N,) bool). ``mirrored``: the model was trained with horizontal flips
        (``augment.horizontal_flip``), so its training images include right hands; their features join the
        training set, and a right hand is accepted."""
        train_features = features_of(*train)
        if mirrored:
            flipped = np.ascontiguousarray(train[0][:, :, ::-1])
            train_features = np.concatenate([train_features, features_of(flipped, train[1])])
        return cls.fit(train_features, features_of(*val), max_hand_rejection, stages)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (N, D) from the training mean: (N,), higher = further
        from hands."""
        z = ((np.asarray(features, dtype=np.float32) - self.mean) / self.scale).astype(np.float32)  # (N, D)
        # float32 products: a served image's score costs one (D, D) product, with no float64 copy of the matrix
        squared = np.einsum("nd,nd->n", z @ self.precision, z).astype(np.float64)
        return np.sqrt(np.maximum(squared, 0.0))

    def rejects(self, features: np.ndarray) -> np.ndarray:
        """(N,) bool: True where an image is too far from the training hands to be read."""
        return self.scores(features) > self.threshold

    def save(self, folder: str | Path) -> Path:
        """Write ``ood.npz`` into ``folder`` (atomically); return its path."""
        path = Path(folder) / OOD_FILE
        with atomic_file(path) as tmp, open(tmp, "wb") as out:
            np.savez(out, stages=np.array(self.stages, dtype=np.str_), mean=self.mean, scale=self.scale,
                     precision=self.precision, threshold=np.float64(self.threshold),
                     val_rejection=np.float64(self.val_rejection),
                     max_hand_rejection=np.float64(self.max_hand_rejection), method=np.str_(self.method))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> OodDetector:
        """Read ``ood.npz`` from a bundle folder; a file holding pickled objects is refused, not run."""
        path = Path(folder) / OOD_FILE
        try:
            with np.load(path, allow_pickle=False) as data:
                detector = cls(tuple(str(s) for s in data["stages"]), data["mean"], data["scale"], data["precision"],
                               threshold=float(data["threshold"]), val_rejection=float(data["val_rejection"]),
                               max_hand_rejection=float(data["max_hand_rejection"]), method=str(data["method"]))
        except (OSError, KeyError, ValueError) as error:  # np.load raises ValueError for object arrays
            raise OodFileError(f"{path} is not a readable out-of-distribution detector: {error}") from error
        dims = len(detector.mean)
        if detector.scale.shape != (dims,) or detector.precision.shape != (dims, dims):
            raise OodFileError(f"{path} is damaged: mean {detector.mean.shape}, scale {detector.scale.shape}, "
                               f"precision {detector.precision.shape} do not agree")
        return detector

    def summary(self) -> dict:
        """The few numbers ``/v1/model`` shows."""
        return {"method": self.method, "stages": list(self.stages), "dims": int(len(self.mean)),
                "threshold": round(self.threshold, 3), "val_rejection": round(self.val_rejection, 4),
                "max_hand_rejection": self.max_hand_rejection}

"""Inference on a model bundle: batched bone-age prediction and Grad-CAM heat maps, without Ray.

The Serve deployment, the plain FastAPI server of the latency benchmark and offline scripts share this code.

Every answer comes with what it rests on (:class:`Answers`): the bias correction, the interval, the
out-of-distribution score (read off the answering forward pass by :class:`~boneage.ood.FeatureTap`) and, for an
ensemble bundle, the spread of its members' answers. An ensemble answers the mean of its members, each run on the
whole batch, so batching works as for one model.

Grad-CAM (pytorch-grad-cam) works by hooks on a layer. Hooks on the model that serves predictions would record
every batch that passes, so explanations run on a private copy of the model, one at a time under a lock: two
concurrent requests can never mix their activations or gradients, and predictions never see a Grad-CAM hook. An
ensemble's heat map is the mean of its members' maps.

Heat-map methods are named (:data:`EXPLAINERS`): a pytorch-grad-cam class, the conv blocks it reads, the regression
target and whether the black padding is masked. :data:`DEFAULT_EXPLAINER` is the one that finds the hand: the
pointing game on phantoms, whose age-bearing structures are known (``bench/localisation.py``,
``boneage.localisation``), chose it.
"""

from __future__ import annotations

import copy
import io
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from boneage.bundle import LoadedBundle, load_bundle, resolve
from boneage.config import AnswerConfig, ServeConfig
from boneage.deid import patient_sex
from boneage.errors import JobError
from boneage.imaging import is_dicom, load_radiograph_sizes
from boneage.model import BoneAgeNet
from boneage.ood import FeatureTap
from boneage.precision import autocast_for, describe, resolve_precision
from boneage.tta import forward_views


@dataclass
class Radiograph:
    """An uploaded radiograph, decoded: the model's canvas and a larger one for showing the heat map on."""

    canvas: np.ndarray  # (S, S) uint8, S = the bundle's image size, as in training
    display: np.ndarray  # (D, D) uint8, the same framing at the overlay size
    dicom_sex: str | None  # PatientSex from a DICOM header (M/F), else None


@dataclass
class Answers:
    """A batch's bone ages as served, and what each one's trust rests on (all arrays (B,))."""

    months: np.ndarray  # as served: bias-corrected when the predictor is calibrated
    raw_months: np.ndarray  # the network's (an ensemble's: its members' mean)
    ood_scores: np.ndarray | None  # distance from the training hands; None when the bundle has no detector
    unlike_hands: np.ndarray  # bool: above the detector's threshold, and the predictor rejects such images
    spread: np.ndarray | None  # an ensemble's members' SD in months; None for a single model

    def row(self, index: int) -> Answers:
        """The answers of image ``index`` alone (a batch of one)."""
        pick = slice(index, index + 1)
        return Answers(self.months[pick], self.raw_months[pick],
                       None if self.ood_scores is None else self.ood_scores[pick], self.unlike_hands[pick],
                       None if self.spread is None else self.spread[pick])


@dataclass
class Explanation:
    """A Grad-CAM heat map of one radiograph."""

    heatmap: np.ndarray  # (S, S) float32 in [0, 1]: where the evidence for this bone age lies
    overlay_png: bytes  # the display canvas with the heat map blended over it


class _SexConditioned(nn.Module):
    """Grad-CAM calls ``model(images)``; this carries the sex input beside it, as a (B, 1) output."""

    def __init__(self, net: BoneAgeNet):
        super().__init__()
        self.net = net
        self.male = torch.zeros(1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image, self.male).unsqueeze(1)  # (B, 1): the standardised bone age


class BoneAgeTarget:
    """Grad-CAM target for regression: how far the estimate lies from the training set's mean age (the model's
    output is standardised, so that is its absolute value). The map shows what makes this hand look older or
    younger than average; with the raw output as target, every child estimated younger than average would get an
    empty map, since Grad-CAM keeps only evidence that raises its target."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[0].abs()


class RawOutputTarget:
    """The standardised estimate itself: evidence for an older hand only (a candidate, compared in the bench)."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[0]


TARGETS = {"abs": BoneAgeTarget, "raw": RawOutputTarget}


@dataclass(frozen=True)
class ExplainerSpec:
    """A heat-map method: a pytorch-grad-cam class reading the last activation of some conv blocks."""

    cam: str  # the pytorch_grad_cam class: GradCAM, HiResCAM, LayerCAM, ...
    blocks: tuple[str, ...]  # the stages whose last activation it reads (several: pytorch-grad-cam averages them)
    target: Literal["abs", "raw"] = "abs"  # |standardised output| (BoneAgeTarget) or the output (RawOutputTarget)
    mask_padding: bool = False  # zero the map on the canvas's black padding (fit_to_square's border), rescale

    def method(self, model: nn.Module, layers: list[nn.Module]):
        """The pytorch-grad-cam object reading ``layers`` of ``model``. Imported here: pytorch-grad-cam takes about
        4 s to import (OpenCV), and a predictor that only predicts (a scoring actor, a replica before its first
        explanation) never needs it."""
        import pytorch_grad_cam

        return getattr(pytorch_grad_cam, self.cam)(model=model, target_layers=layers)

    def lowest_block(self, net: BoneAgeNet) -> int:
        """Index of the lowest stage it reads: the stages below it need no graph."""
        return min(i for i, stage in enumerate(net.stages) if stage.name in self.blocks)


# The candidates of the pointing-game comparison (bench/results/localisation.json), named
# <method>-<blocks>[-raw][-masked]. "gradcam-block5" was the method until issue 14: at the demo's 32 px its map is
# 2x2 cells, and its peak fell in the film's corners and border.
EXPLAINERS: dict[str, ExplainerSpec] = {
    "gradcam-block5": ExplainerSpec("GradCAM", ("block5",)),
    "gradcam-block5-raw": ExplainerSpec("GradCAM", ("block5",), target="raw"),
    "gradcam-block3": ExplainerSpec("GradCAM", ("block3",)),
    "gradcam-block2+3": ExplainerSpec("GradCAM", ("block2", "block3")),
    "hirescam-block3": ExplainerSpec("HiResCAM", ("block3",)),
    "hirescam-block2": ExplainerSpec("HiResCAM", ("block2",)),
    "gradcam++-block4": ExplainerSpec("GradCAMPlusPlus", ("block4",)),
    "layercam-block3": ExplainerSpec("LayerCAM", ("block3",)),
    "layercam-block3-raw": ExplainerSpec("LayerCAM", ("block3",), target="raw"),
    "layercam-block2+3": ExplainerSpec("LayerCAM", ("block2", "block3")),
    "layercam-block2+3-raw": ExplainerSpec("LayerCAM", ("block2", "block3"), target="raw"),
    "layercam-block2+3-raw-masked": ExplainerSpec("LayerCAM", ("block2", "block3"), target="raw", mask_padding=True),
}
DEFAULT_EXPLAINER = "layercam-block3-raw"
HEATMAP_BATCH = 32  # images per Grad-CAM pass: bounds the activations kept for the backward pass


def explainer(name: str) -> ExplainerSpec:
    """The heat-map method called ``name``; unknown names fail listing the known ones."""
    if name not in EXPLAINERS:
        raise UnknownExplainer(f"unknown explainer {name!r} (serve.explainer); choose one of: {', '.join(EXPLAINERS)}")
    return EXPLAINERS[name]


class ModelBroken(RuntimeError):
    """The loaded model no longer gives finite answers."""


class UnknownExplainer(JobError, ValueError):
    """An explainer name that :data:`EXPLAINERS` does not hold."""


def padding_mask(canvases: np.ndarray) -> np.ndarray:
    """(B, S, S) bool, True inside the image: fit_to_square pads with whole black rows or columns at the edges,
    so the image is the box from the first to the last row and column with any non-black pixel."""
    mask = np.zeros(canvases.shape, dtype=bool)
    for canvas, keep in zip(canvases, mask):
        rows, cols = np.flatnonzero(canvas.any(axis=1)), np.flatnonzero(canvas.any(axis=0))
        if rows.size:
            keep[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
        else:
            keep[:] = True  # an all-black canvas: nothing to tell apart
    return mask


class BoneAgePredictor:
    """A loaded bundle ready to answer: :meth:`answer` (and ``predict``) for batches, ``explain`` for one image's
    Grad-CAM heat map. ``answers`` holds the settings the service and the bulk jobs share (bias correction,
    interval level, test-time augmentation, out-of-distribution rejection)."""

    def __init__(self, bundle: LoadedBundle, answers: AnswerConfig | None = None, overlay_size: int = 384,
                 max_megapixels: float = 64.0, precision: str = "auto", device: str = "cpu",
                 explainer_name: str = DEFAULT_EXPLAINER):
        settings = answers or AnswerConfig()
        self.bundle = bundle
        self.trust = bundle.meta.trust  # None for a bundle written before format 2: raw answers, no intervals
        self.calibrated = settings.calibrate and self.trust is not None
        self.interval_level = settings.interval_level
        self.tta = settings.tta  # a choice of boneage.tta.VIEWS: the views each answer averages
        self.ood = bundle.ood  # None: the bundle has no detector, every image is answered
        self.rejects_ood = settings.reject_ood and self.ood is not None
        self.image_size = bundle.meta.image_size
        self.overlay_size = overlay_size
        self.max_megapixels = max_megapixels
        # fp32, contiguous copies: Grad-CAM as pytorch-grad-cam computes it
        self._explainers = [_SexConditioned(copy.deepcopy(net).eval()) for net in bundle.members]
        self.device = torch.device(device)  # of predictions (bulk scoring on GPU actors); Grad-CAM stays on the CPU
        self.members = [net.eval().to(self.device, memory_format=torch.channels_last) for net in bundle.members]
        self.model = self.members[0]
        self._tap = FeatureTap(self.model, self.ood.stages) if self.ood else None  # the detector reads member 0
        # bf16 answers differ from fp32 by about 0.1 month (at most 0.3 in a trained model's 64 phantoms) and do
        # not depend on what else is in the batch; on AMX CPUs a batch of 32 costs 3 ms per image against 15 ms
        # for one image in fp32, which is what makes batching pay.
        self._autocast = autocast_for(self.device, precision, "predict")
        self.precision = resolve_precision(precision, self.device, "predict")  # bf16 | fp32
        self.computes_in = describe(self.device, precision, "predict")  # for logs and /v1/model
        self.explainer_name = explainer(explainer_name) and explainer_name  # checked here, not on the first request
        self._cam_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ServeConfig) -> BoneAgePredictor:
        """The bundle ``serve.model_uri`` names (a folder or a registry reference such as ``name:best``), its
        checksum verified, with the service's overlay size and decompression-bomb guard."""
        return cls(load_bundle(resolve(settings.model_uri, settings.registry_root)), answers=settings,
                   overlay_size=settings.overlay_size, max_megapixels=settings.max_image_megapixels,
                   precision=settings.precision, explainer_name=settings.explainer or DEFAULT_EXPLAINER)

    def decode(self, data: bytes) -> Radiograph:
        """File bytes (PNG, JPEG or DICOM) -> both canvases, the model's exactly as prepare frames the file
        (:func:`~boneage.imaging.load_radiograph`); raises ``ImageRejected`` with a reason code."""
        canvas, display = load_radiograph_sizes(data, (self.image_size, self.overlay_size), self.max_megapixels)
        return Radiograph(canvas, display, patient_sex(data) if is_dicom(data) else None)

    def answer(self, canvases: np.ndarray, male: np.ndarray) -> Answers:
        """``canvases`` (B, S, S) uint8 and ``male`` (B,) bool -> the served answers with their trust signals, from
        one forward pass of each member."""
        members, features = self._forward(canvases, male)  # (K, B) months, (B, D) or None
        raw = members.mean(axis=0)
        scores = self.ood.scores(features) if features is not None else None
        unlike = scores > self.ood.threshold if self.rejects_ood else np.zeros(len(raw), dtype=bool)
        spread = members.std(axis=0, ddof=1) if len(members) > 1 else None
        return Answers(self.correct(raw), raw, scores, unlike, spread)

    def predict(self, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
        """``canvases`` (B, S, S) uint8 and ``male`` (B,) bool -> bone ages (B,) in months, as served: with the
        bundle's bias correction unless it has none or it was turned off."""
        return self.answer(canvases, male).months

    def predict_raw(self, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
        """``canvases`` (B, S, S) uint8 and ``male`` (B,) bool -> the network's bone ages (B,) in months (an
        ensemble's: its members' mean)."""
        return self.members_raw(canvases, male).mean(axis=0)

    def members_raw(self, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
        """Each member's own bone ages (K, B) in months (K = 1 for a single model)."""
        return self._forward(canvases, male)[0]

    def features(self, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
        """The out-of-distribution features (N, D) of ``canvases`` as :meth:`answer` computes them (this
        predictor's precision; the first member's stages of ``stages``): what a detector is fitted on."""
        tap = self._tap or FeatureTap(self.model)
        try:
            return self._forward(canvases, male, tap, first_only=True)[1]  # an ensemble's other members: unread
        finally:
            if tap is not self._tap:
                tap.remove()

    def check(self) -> None:
        """Raise :class:`ModelBroken` unless a probe image (mid-grey) gets a finite bone age from every member: the
        service's health check, so that a replica whose weights went bad is replaced."""
        probe = np.full((1, self.image_size, self.image_size), 128, dtype=np.uint8)
        months = self.members_raw(probe, np.array([False]))  # (K, 1)
        if not np.isfinite(months).all():
            raise ModelBroken(f"the model answers {months.ravel().tolist()} months for a probe image: its weights "
                              "are damaged; reload the bundle")

    def correct(self, raw: np.ndarray) -> np.ndarray:
        """Raw answers (months) -> as served: bias-corrected when the predictor is calibrated."""
        return self.trust.calibration.apply(raw) if self.calibrated else raw

    def interval(self, months: np.ndarray, male: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(low, high)`` months around answers of :meth:`predict`, at the predictor's level; None when the
        bundle has no intervals (written before format 2)."""
        if self.trust is None:
            return None
        intervals = self.trust.intervals if self.calibrated else self.trust.intervals_raw
        return intervals.interval(months, male, self.interval_level)

    @torch.inference_mode()
    def _forward(self, canvases: np.ndarray, male: np.ndarray, tap: FeatureTap | None = None,
                 first_only: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Each member's bone ages (K, B) in months (K = 1 with ``first_only``), and the first member's tapped
        features (B, D) (None without a tap)."""
        tap = tap or self._tap
        images = torch.from_numpy(canvases).unsqueeze(1).to(self.device)  # (B, 1, S, S) uint8: the model scales it
        sex = torch.from_numpy(male.astype(np.float32)).to(self.device)
        answers, features = [], None
        with self._autocast:
            for index, net in enumerate(self.members[:1] if first_only else self.members):
                if index == 0 and tap is not None:
                    with tap.collect() as collected:
                        answers.append(forward_views(net, images, sex, self.tta))  # (B,) over the views of tta
                    features = tap.features(collected, len(canvases))
                else:
                    answers.append(forward_views(net, images, sex, self.tta))
        standardised = torch.stack(answers).float().cpu()  # (K, B)
        return self.bundle.to_months(standardised).numpy().astype(np.float64), features

    def explain(self, radiograph: Radiograph, male: bool) -> Explanation:
        """The heat map of the predictor's explainer for one radiograph, blended over its display canvas as a PNG
        (the answer itself comes from :meth:`answer`)."""
        heatmap = self.heatmaps(radiograph.canvas[None], np.array([male]))[0]  # (S, S) in [0, 1]
        return Explanation(heatmap, self._overlay(radiograph.display, heatmap))

    def heatmaps(self, canvases: np.ndarray, male: np.ndarray, method: str | None = None) -> np.ndarray:
        """``canvases`` (B, S, S) uint8 and ``male`` (B,) bool -> heat maps (B, S, S) float32 in [0, 1], by the
        explainer ``method`` names (default: the predictor's, which serving uses); an ensemble's members' mean."""
        spec = explainer(method or self.explainer_name)
        maps = [self._cam_batch(spec, canvases[i:i + HEATMAP_BATCH], male[i:i + HEATMAP_BATCH])
                for i in range(0, len(canvases), HEATMAP_BATCH)]
        heat = np.concatenate(maps) if maps else np.zeros(canvases.shape, dtype=np.float32)
        if spec.mask_padding:
            heat = heat * padding_mask(canvases)
            heat = heat / np.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-7)
        return heat.astype(np.float32)

    def _cam_batch(self, spec: ExplainerSpec, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
        """The members' mean heat map of one batch."""
        images = torch.from_numpy(canvases).unsqueeze(1)  # (B, 1, S, S) uint8: the model scales it
        with self._cam_lock:  # one explanation at a time: the hooks, the frozen blocks and the sex input are per call
            return np.mean([self._member_cam(spec, wrapped, images, male) for wrapped in self._explainers], axis=0)

    @staticmethod
    def _member_cam(spec: ExplainerSpec, wrapped: _SexConditioned, images: torch.Tensor,
                    male: np.ndarray) -> np.ndarray:
        net = wrapped.net
        wrapped.male = torch.from_numpy(np.asarray(male, dtype=np.float32))
        # Gradients are needed only above the lowest block the method reads: the blocks below run without
        # building a graph, so a top-block map costs about one forward pass, not forward plus backward.
        net.freeze_bottom_blocks(spec.lowest_block(net))
        layers = [net.get_submodule(stage.activation) for stage in net.stages if stage.name in spec.blocks]
        cam = spec.method(wrapped, layers)
        try:  # not `with cam`: its __exit__ swallows an IndexError
            return cam(input_tensor=images, targets=[TARGETS[spec.target]()] * len(images))
        finally:
            cam.activations_and_grads.release()  # hooks off: the next call may read other layers

    def _overlay(self, display: np.ndarray, heatmap: np.ndarray) -> bytes:
        from pytorch_grad_cam.utils.image import show_cam_on_image  # see ExplainerSpec.method

        size = display.shape[0]
        big = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
        rgb = np.repeat(display[..., None], 3, axis=2).astype(np.float32) / 255.0  # (D, D, 3)
        blended = show_cam_on_image(rgb, np.clip(big, 0.0, 1.0), use_rgb=True, image_weight=0.6)  # (D, D, 3) uint8
        return encode_png(blended)


def encode_png(pixels: np.ndarray) -> bytes:
    """A uint8 image, (H, W) gray or (H, W, 3) RGB, as PNG bytes, compressed for speed over size."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def heatmap_grid(heatmap: np.ndarray, cells: int) -> list[list[float]]:
    """The heat map averaged down to ``cells`` x ``cells`` (row-major, top row first), 3 decimals."""
    small = Image.fromarray(heatmap.astype(np.float32)).resize((cells, cells), Image.Resampling.BOX)
    return np.round(np.asarray(small, dtype=np.float64), 3).tolist()

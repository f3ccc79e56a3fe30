"""Inference on a model bundle: batched bone-age prediction and Grad-CAM heat maps, without Ray.

The Serve deployment, the plain FastAPI server of the latency benchmark and offline scripts share this code.

Grad-CAM (pytorch-grad-cam) works by hooks on a layer. Hooks on the model that serves predictions would record
every batch that passes, so explanations run on a private copy of the model, one at a time under a lock: two
concurrent requests can never mix their activations or gradients, and predictions never see a hook.

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
import pydicom
import torch
from PIL import Image
from torch import nn

from boneage.bundle import LoadedBundle, load_bundle, resolve
from boneage.config import AnswerConfig, ServeConfig
from boneage.errors import JobError
from boneage.imaging import is_dicom, load_radiograph_sizes
from boneage.model import BoneAgeNet
from boneage.precision import autocast_for, describe, resolve_precision
from boneage.tta import forward_views


@dataclass
class Radiograph:
    """An uploaded radiograph, decoded: the model's canvas and a larger one for showing the heat map on."""

    canvas: np.ndarray  # (S, S) uint8, S = the bundle's image size, as in training
    display: np.ndarray  # (D, D) uint8, the same framing at the overlay size
    dicom_sex: str | None  # PatientSex from a DICOM header (M/F), else None


@dataclass
class Explanation:
    """A prediction with its Grad-CAM heat map."""

    bone_age_months: float
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
    """A loaded bundle ready to answer: ``predict`` for batches, ``explain`` for one image with Grad-CAM."""

    def __init__(self, bundle: LoadedBundle, overlay_size: int = 384, max_megapixels: float = 64.0,
                 precision: str = "auto", device: str = "cpu", explainer_name: str = DEFAULT_EXPLAINER,
                 calibrate: bool = AnswerConfig.calibrate,
                 interval_level: float = AnswerConfig.interval_level, tta: str = AnswerConfig.tta):
        self.bundle = bundle
        self.trust = bundle.meta.trust  # None for a bundle written before format 2: raw answers, no intervals
        self.calibrated = calibrate and self.trust is not None
        self.interval_level = interval_level
        self.tta = tta  # a choice of boneage.tta.VIEWS: the views each answer averages
        self.image_size = bundle.meta.image_size
        self.overlay_size = overlay_size
        self.max_megapixels = max_megapixels
        explain_net = copy.deepcopy(bundle.model).eval()  # fp32, contiguous: Grad-CAM as pytorch-grad-cam computes it
        self.device = torch.device(device)  # of predictions (bulk scoring on GPU actors); Grad-CAM stays on the CPU
        self.model = bundle.model.eval().to(self.device, memory_format=torch.channels_last)
        # bf16 answers differ from fp32 by about 0.1 month (at most 0.3 in a trained model's 64 phantoms) and do
        # not depend on what else is in the batch; on AMX CPUs a batch of 32 costs 3 ms per image against 15 ms
        # for one image in fp32, which is what makes batching pay.
        self._autocast = autocast_for(self.device, precision, "predict")
        self.precision = resolve_precision(precision, self.device, "predict")  # bf16 | fp32
        self.computes_in = describe(self.device, precision, "predict")  # for logs and /v1/model
        self.explainer_name = explainer(explainer_name) and explainer_name  # checked here, not on the first request
        self._explainer = _SexConditioned(explain_net)
        self._cam_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ServeConfig) -> BoneAgePredictor:
        """The bundle ``serve.model_uri`` names (a folder or a registry reference such as ``name:best``), its
        checksum verified, with the service's overlay size and decompression-bomb guard."""
        return cls(load_bundle(resolve(settings.model_uri, settings.registry_root)),
                   overlay_size=settings.overlay_size, max_megapixels=settings.max_image_megapixels,
                   precision=settings.precision, explainer_name=settings.explainer or DEFAULT_EXPLAINER,
                   calibrate=settings.calibrate, interval_level=settings.interval_level, tta=settings.tta)

    def decode(self, data: bytes) -> Radiograph:
        """File bytes (PNG, JPEG or DICOM) -> both canvases, the model's exactly as prepare frames the file
        (:func:`~boneage.imaging.load_radiograph`); raises ``ImageRejected`` with a reason code."""
        canvas, display = load_radiograph_sizes(data, (self.image_size, self.overlay_size), self.max_megapixels)
        return Radiograph(canvas, display, dicom_patient_sex(data) if is_dicom(data) else None)

    def predict(self, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
        """``canvases`` (B, S, S) uint8 and ``male`` (B,) bool -> bone ages (B,) in months, as served: with the
        bundle's bias correction unless it has none or it was turned off."""
        return self.correct(self.predict_raw(canvases, male))

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
    def predict_raw(self, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
        """``canvases`` (B, S, S) uint8 and ``male`` (B,) bool -> the network's bone ages (B,) in months."""
        images = torch.from_numpy(canvases).unsqueeze(1).to(self.device)  # (B, 1, S, S) uint8: the model scales it
        with self._autocast:
            standardised = forward_views(self.model, images,  # (B,), averaged over the views of self.tta
                                         torch.from_numpy(male.astype(np.float32)).to(self.device), self.tta)
        return self.bundle.to_months(standardised.float().cpu()).numpy().astype(np.float64)

    def explain(self, radiograph: Radiograph, male: bool) -> Explanation:
        """The bone age (exactly what :meth:`predict` answers) and its heat map (the predictor's explainer),
        blended over the display canvas as a PNG."""
        heatmap = self.heatmaps(radiograph.canvas[None], np.array([male]))[0]  # (S, S) in [0, 1]
        months = float(self.predict(radiograph.canvas[None], np.array([male]))[0])
        return Explanation(months, heatmap, self._overlay(radiograph.display, heatmap))

    def heatmaps(self, canvases: np.ndarray, male: np.ndarray, method: str | None = None) -> np.ndarray:
        """``canvases`` (B, S, S) uint8 and ``male`` (B,) bool -> heat maps (B, S, S) float32 in [0, 1], by the
        explainer ``method`` names (default: the predictor's, which serving uses)."""
        spec = explainer(method or self.explainer_name)
        maps = [self._cam_batch(spec, canvases[i:i + HEATMAP_BATCH], male[i:i + HEATMAP_BATCH])
                for i in range(0, len(canvases), HEATMAP_BATCH)]
        heat = np.concatenate(maps) if maps else np.zeros(canvases.shape, dtype=np.float32)
        if spec.mask_padding:
            heat = heat * padding_mask(canvases)
            heat = heat / np.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-7)
        return heat.astype(np.float32)

    def _cam_batch(self, spec: ExplainerSpec, canvases: np.ndarray, male: np.ndarray) -> np.ndarray:
        net = self._explainer.net
        images = torch.from_numpy(canvases).unsqueeze(1)  # (B, 1, S, S) uint8: the model scales it
        with self._cam_lock:  # one explanation at a time: the hooks, the frozen blocks and the sex input are per call
            self._explainer.male = torch.from_numpy(np.asarray(male, dtype=np.float32))
            # Gradients are needed only above the lowest block the method reads: the blocks below run without
            # building a graph, so a top-block map costs about one forward pass, not forward plus backward.
            net.freeze_bottom_blocks(spec.lowest_block(net))
            layers = [net.get_submodule(stage.activation) for stage in net.stages if stage.name in spec.blocks]
            cam = spec.method(self._explainer, layers)
            try:  # not `with cam`: its __exit__ swallows an IndexError
                return cam(input_tensor=images, targets=[TARGETS[spec.target]()] * len(canvases))
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


def dicom_patient_sex(data: bytes) -> str | None:
    """PatientSex (0010,0040) of a DICOM file as ``M``/``F``; None when absent or anything else (e.g. ``O``)."""
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["PatientSex"])
    except Exception:  # an unreadable header: decoding the pixels reports the problem
        return None
    value = str(header.get("PatientSex", "")).strip().upper()
    return value if value in ("M", "F") else None

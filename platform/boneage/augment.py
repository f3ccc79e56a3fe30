"""Training augmentations with Kornia, applied per batch on the training device (the GPU when there is one).

The settings are Keras ImageDataGenerator's, one to one, so the original design's values carry over:

==================== ============================================================================
Keras setting        here
==================== ============================================================================
rotation_range       RandomAffine degrees: uniform in [-r, r]
width_shift_range    RandomAffine translate: up to this fraction of the width, either way
height_shift_range   RandomAffine translate: up to this fraction of the height, either way
zoom_range z         RandomAffine scale: Keras draws zx, zy in [1-z, 1+z] and samples the input at
                     zx (a magnification of 1/zx); the same magnification range, x and y independent
brightness_range     RandomContrast: multiplies the pixel values by a factor in [low, high], clipped
                     (Kornia's *brightness* adds; Keras's brightness multiplies, like this)
horizontal_flip      RandomHorizontalFlip, p = 0.5
fill_mode            padding: nearest -> border, constant -> zeros (black), reflect -> reflection
==================== ============================================================================

Rotation, shift and zoom are one affine warp (a single resampling). Kornia draws from torch's global RNG: seed it
(``torch.manual_seed``) for repeatable augmentations. Validation batches are never augmented.
"""

from __future__ import annotations

import logging
from pathlib import Path

import kornia.augmentation as K
import torch
import torchvision.utils
from torch import nn

from boneage.artifacts import atomic_file
from boneage.config import AugmentConfig, Config
from boneage.dataset import batch_tensors, read_manifest, read_split
from boneage.model import to_unit
from boneage.precision import describe

log = logging.getLogger(__name__)

PADDING = {"nearest": "border", "constant": "zeros", "reflect": "reflection"}


def build_augmentation(cfg: AugmentConfig) -> nn.Module:
    """A module mapping a float batch (B, 1, H, W) in [0, 1] to an augmented batch of the same shape."""
    ops: list[nn.Module] = []
    if cfg.rotation_range or cfg.width_shift_range or cfg.height_shift_range or cfg.zoom_range:
        z = cfg.zoom_range
        magnify = (1.0 / (1.0 + z), 1.0 / (1.0 - z))
        ops.append(K.RandomAffine(
            degrees=cfg.rotation_range, translate=(cfg.width_shift_range, cfg.height_shift_range),
            scale=(*magnify, *magnify), padding_mode=PADDING[cfg.fill_mode], p=1.0))
    if cfg.horizontal_flip:
        ops.append(K.RandomHorizontalFlip(p=0.5))
    low, high = cfg.brightness_range
    if (low, high) != (1.0, 1.0):
        ops.append(K.RandomContrast(contrast=(low, high), clip_output=True, p=1.0))
    if not ops:
        return nn.Identity()
    return K.AugmentationSequential(*ops, data_keys=["input"])


def write_preview(images: torch.Tensor, cfg: AugmentConfig, path: str | Path, seed: int = 0,
                  variants: int = 3) -> Path:
    """Save a PNG grid: the first row shows ``images`` (N, 1, S, S) uint8 as they are, each row below one random
    augmentation of every image, so the settings can be judged by eye before training."""
    torch.manual_seed(seed)
    augment = build_augmentation(cfg)
    originals = to_unit(images)
    rows = [originals] + [augment(originals) for _ in range(variants)]
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=len(images), padding=2, pad_value=1.0)
    with atomic_file(path) as tmp:
        torchvision.utils.save_image(grid, tmp, format="png")
    return Path(path)


def preview_augmentations(cfg: Config) -> Path:
    """Write the augmentation preview grid for the first ``augment.preview_images`` training images of the prepared
    dataset ``data.out`` (the preview job: it reads with Ray Data, and needs no Ray Train)."""
    image_size = read_manifest(cfg.data.out)["image_size"]
    rows = read_split(cfg.data.out, "train").take_batch(cfg.augment.preview_images, batch_format="numpy")
    images = batch_tensors(rows, image_size)["image"]
    log.info("augmenting %d images: %s", len(images), describe(torch.device("cpu"), "fp32", "train",
                                                                 why="augmentation computes in fp32"))
    return write_preview(images, cfg.augment, cfg.augment.preview_path, seed=cfg.train.seed)

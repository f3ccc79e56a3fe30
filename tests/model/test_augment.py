"""Kornia augmentations do what their Keras-named settings say."""

import numpy as np
import pytest
import torch
from PIL import Image

from boneage.augment import build_augmentation, write_preview
from boneage.config import load_config

NEUTRAL = ["augment.rotation_range=0", "augment.width_shift_range=0", "augment.height_shift_range=0",
           "augment.zoom_range=0", "augment.horizontal_flip=false", "augment.brightness_range=[1, 1]"]


def augmentation(*overrides):
    return build_augmentation(load_config(overrides=[*NEUTRAL, *overrides]).augment)


def batch(n=8, size=32):
    torch.manual_seed(123)
    return torch.rand(n, 1, size, size)


def test_zero_ranges_are_the_identity():
    images = batch()
    assert torch.equal(augmentation()(images), images)


def test_horizontal_flip_mirrors_about_half_the_images():
    images = batch(64)
    torch.manual_seed(0)
    out = augmentation("augment.horizontal_flip=true")(images)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    unchanged = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or u for f, u in zip(flipped, unchanged))
    assert 16 < sum(flipped) < 48


def test_brightness_multiplies_pixel_values():
    images = batch() * 0.5
    out = augmentation("augment.brightness_range=[1.5, 1.5]")(images)
    assert torch.allclose(out, images * 1.5, atol=1e-6)


def test_augmentations_repeat_with_the_same_seed():
    aug = augmentation("augment.rotation_range=30", "augment.zoom_range=0.2", "augment.width_shift_range=0.1",
                       "augment.horizontal_flip=true")
    images = batch()
    torch.manual_seed(7)
    first = aug(images)
    torch.manual_seed(7)
    assert torch.equal(aug(images), first)
    assert not torch.allclose(first, images)


@pytest.mark.parametrize("fill_mode, edges_stay_white", [("constant", False), ("nearest", True),
                                                          ("reflect", True)])
def test_fill_mode_decides_what_comes_in_from_outside(fill_mode, edges_stay_white):
    white = torch.ones(16, 1, 32, 32)
    torch.manual_seed(1)
    out = augmentation("augment.zoom_range=0.5", f"augment.fill_mode={fill_mode}")(white)  # some zoom out
    assert bool(out.min() > 0.99) == edges_stay_white


def test_shift_moves_content_by_up_to_the_fraction():
    image = torch.zeros(1, 1, 32, 32)
    image[..., 14:18, 14:18] = 1.0
    torch.manual_seed(3)
    out = augmentation("augment.width_shift_range=0.25", "augment.fill_mode=constant")(image.expand(16, -1, -1, -1))
    columns = [(o[0].sum(0) > 0.5).nonzero().float().mean().item() for o in out]
    assert max(abs(c - 15.5) for c in columns) <= 0.25 * 32 + 1
    assert len({round(c) for c in columns}) > 3  # it does move


def test_preview_grid_shows_originals_above_augmented_rows(tmp_path):
    images = (batch(5, 32) * 255).to(torch.uint8)
    cfg = load_config(overrides=["augment.horizontal_flip=true"]).augment
    path = write_preview(images, cfg, tmp_path / "grid.png", variants=3)
    grid = torch.from_numpy(np.array(Image.open(path).convert("L")))  # a writable copy
    assert grid.shape == (2 + 4 * 34, 2 + 5 * 34)  # 4 rows (original + 3 variants) of 5 images, 2 px borders
    first = grid[2:34, 2:34]
    assert torch.equal(first, images[0, 0])  # the top row is the untouched image

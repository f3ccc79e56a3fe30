"""Test-time augmentation: the model reads several views of each radiograph and its answers are averaged.

A view is a horizontal flip and/or a small rotation of the model's canvas, made with Kornia on the model's device.
All views of a batch go through the network in ONE forward pass, ``(V*B, 1, S, S)``, so a batch of one image costs
one call, not V. The views keep the model's pixel convention (floats in [0, 1], which
:func:`boneage.model.to_unit` takes as they are) and its framing: the canvas's black padding stays black, and a
rotation fills the corners it uncovers with black (zeros), as ``fit_to_square`` pads, never with the border.

The rotations stay within what training showed the model (``augment.rotation_range``, 5 degrees by default);
training also mirrors half of its images (``augment.horizontal_flip``), so a left hand read mirrored is no
surprise to it. Whether averaging pays is measured by ``bench/tta.py`` (bench/results/tta.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from boneage.config import TtaChoice
from boneage.model import to_unit

ROTATION_DEGREES = 5.0  # training's default rotation_range: the views stay among the images the model learnt from


@dataclass(frozen=True)
class View:
    """One view of a canvas: mirrored left-right or not, then rotated by ``degrees`` (counter-clockwise)."""

    flip: bool = False
    degrees: float = 0.0


VIEWS: dict[TtaChoice, tuple[View, ...]] = {  # the choices of the setting tta (serve, predict, eval)
    "none": (View(),),
    "flip": (View(), View(flip=True)),
    "rotate": (View(), View(degrees=ROTATION_DEGREES), View(degrees=-ROTATION_DEGREES)),
    "flip+rotate": tuple(View(flip, degrees) for flip in (False, True)
                         for degrees in (0.0, ROTATION_DEGREES, -ROTATION_DEGREES)),
}


def make_views(images: torch.Tensor, choice: str) -> torch.Tensor:
    """``images`` (B, 1, S, S), uint8 as stored or float in [0, 1] -> (V*B, 1, S, S) float in [0, 1]: view after
    view, each over the whole batch (rows ``v*B .. v*B+B-1`` hold view ``v``)."""
    unit = to_unit(images)
    # Outside any autocast: the rotation's sampling grid in bf16 would move pixels by up to half a pixel.
    with torch.autocast(device_type=unit.device.type, enabled=False):
        return torch.cat([_view(unit.float(), view) for view in VIEWS[choice]])


def _view(unit: torch.Tensor, view: View) -> torch.Tensor:
    # Imported here: Kornia takes ~2 s to import, which every scoring actor and replica would pay with TTA off.
    import kornia.geometry.transform as KT

    image = KT.hflip(unit) if view.flip else unit
    if view.degrees:
        angle = torch.full((len(image),), view.degrees, device=image.device)
        image = KT.rotate(image, angle, mode="bilinear", padding_mode="zeros", align_corners=True)
    return image.clamp_(0.0, 1.0) if view.degrees else image


def forward_views(model: nn.Module, images: torch.Tensor, male: torch.Tensor, choice: str) -> torch.Tensor:
    """The model's standardised answers (B,) for ``images`` (B, 1, S, S) and ``male`` (B,), averaged over the
    views of ``choice`` in one forward pass; with ``none``, exactly ``model(images, male)``."""
    if choice == "none":
        return model(images, male)
    count = len(VIEWS[choice])
    outputs = model(make_views(images, choice), male.repeat(count))  # (V*B,)
    return outputs.float().view(count, len(images)).mean(dim=0)

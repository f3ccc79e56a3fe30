"""The bone-age regressor: a torchvision VGG16 backbone, a sex embedding, and a small regression head.

Shapes for a batch of B grayscale images of side S (S divisible by 32):

    image (B, 1, S, S) uint8 -> [0, 1] -> features (B, 512, S/32, S/32) -> pooled (B, F)
    male  (B,) float 0/1               -> sex embedding (B, E)
    concat (B, F + E) -> head -> (B,) standardised bone age (multiply by the training SD, add the mean)

F is 512 for ``avg``/``max`` pooling and 512 * (S/32)^2 for ``flatten`` (the original 6x6x512 design at S=192).
The grayscale image is replicated to three channels and normalised with ImageNet's statistics inside the model, so
pretrained weights see exactly what they were trained on. (Folding the three channels into the first convolution's
weights would save 0.5% of the FLOPs but is not exact: zero padding then means a different value at the border.)

One pixel convention, here only (:func:`to_unit`): the model takes the stored uint8 image and scales it to [0, 1]
itself, so training, validation, serving and Grad-CAM cannot drift apart. A float image is taken as already in
[0, 1]: that is what an augmented training batch is (Kornia computes in floats). The memory format is the weights':
training and serving put them in channels_last, and the convolutions then compute channels_last whatever the
image's layout (a one-channel image has no other: ``contiguous(memory_format=torch.channels_last)`` returns it as
it is).

The backbone's five conv blocks are named stages, ``block1`` (bottom) to ``block5`` (top), each described like
timm's ``feature_info`` (:class:`Stage`: its modules by name, channels, reduction). Freezing, the optimizer's
parameter groups and the Grad-CAM target layer ask for them by name; the parameter names stay torchvision's
(``features.0.weight``, ...), so pretrained weights and every bundle load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from boneage.config import ModelConfig
from boneage.errors import JobError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_BLOCKS = 5  # VGG16's conv blocks, each ending in a max-pool


class WeightsNotFound(JobError, FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine."""


@dataclass(frozen=True)
class Stage:
    """One conv block of the backbone, as timm's ``feature_info`` describes a stage."""

    name: str  # block1 (bottom) .. block5 (top)
    modules: tuple[str, ...]  # its layers' names in the model, in order, the max-pool last
    activation: str  # the name of its last activation, the pool's input: the finest map the block computes
    channels: int  # channels of its output
    reduction: int  # the input's side over its output's side: 2, 4, 8, 16, 32


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """The pixel convention: a stored uint8 image -> float in [0, 1]; a float image is taken as already in [0, 1]."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


class BoneAgeNet(nn.Module):
    """VGG16 features + sex embedding -> standardised bone age."""

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        # Constants, not weights: made on the CPU even when the layers are built on the meta device (load_bundle)
        self.register_buffer("rgb_mean", torch.tensor(IMAGENET_MEAN, device="cpu").view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(IMAGENET_STD, device="cpu").view(1, 3, 1, 1), persistent=False)
        self.features = torchvision.models.get_model(cfg.arch, weights=None).features
        self.pool = {"avg": nn.AdaptiveAvgPool2d(1), "max": nn.AdaptiveMaxPool2d(1), "flatten": nn.Identity()}[
            cfg.pooling]
        pooled = 512 * ((image_size // 32) ** 2 if cfg.pooling == "flatten" else 1)
        self.sex = nn.Sequential(nn.Linear(1, cfg.sex_embedding), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        width = pooled + cfg.sex_embedding
        for hidden in cfg.head:
            layers += [nn.Dropout(cfg.dropout), nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*layers)
        self.stages = vgg_stages(self.features)
        self.frozen_blocks = 0  # the bottom stages, run without gradients

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        """``image`` (B, 1, S, S) uint8 as stored, or float in [0, 1]; ``male`` (B,) 0/1 -> (B,) standardised age."""
        x = (to_unit(image).expand(-1, 3, -1, -1) - self.rgb_mean) / self.rgb_std  # (B, 3, S, S), ImageNet's way
        frozen, trainable = self.features[:self.frozen_layers], self.features[self.frozen_layers:]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_layers):
            x = frozen(x)  # no activations kept for backward: frozen blocks cost only their forward
        features = self.pool(trainable(x)).flatten(1)  # (B, F)
        sex = self.sex(male.to(features.dtype).unsqueeze(1))  # (B, E)
        return self.head(torch.cat([features, sex], dim=1)).squeeze(1)  # (B,)

    @property
    def frozen_layers(self) -> int:
        """How many of the first layers of ``features`` the frozen stages hold."""
        return sum(len(stage.modules) for stage in self.stages[:self.frozen_blocks])

    def freeze_bottom_blocks(self, count: int) -> None:
        """Freeze the bottom ``count`` stages: no gradients, batch-norm statistics fixed."""
        self.frozen_blocks = count
        self.train(self.training)

    def frozen_stages(self) -> set[str]:
        """The names of the frozen stages."""
        return {stage.name for stage in self.stages[:self.frozen_blocks]}

    def train(self, mode: bool = True) -> BoneAgeNet:
        super().train(mode)
        for layer in self.features[:self.frozen_layers]:
            layer.eval()  # frozen batch-norm layers keep their statistics
        return self

    def stage_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of the stage called ``name``."""
        stage = next(stage for stage in self.stages if stage.name == name)
        return [p for module in stage.modules for p in self.get_submodule(module).parameters()]

    def parameter_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups, each named: ``head`` (the sex embedding and the regression head) at ``lr``,
        then each stage, bottom to top, at ``lr * backbone_lr_scale``; all with ``weight_decay``."""
        head = [*self.sex.parameters(), *self.head.parameters()]
        groups = [{"name": "head", "params": head, "lr": lr, "weight_decay": weight_decay}]
        return groups + [{"name": stage.name, "params": self.stage_parameters(stage.name),
                          "lr": lr * backbone_lr_scale, "weight_decay": weight_decay} for stage in self.stages]


def build_model(cfg: ModelConfig, image_size: int) -> BoneAgeNet:
    """A new model with the backbone weights ``cfg.weights`` asks for (``none``: random initialisation)."""
    if image_size % 32:
        raise ValueError(f"image size {image_size} must be a multiple of 32 for VGG16's five max-pools")
    model = BoneAgeNet(cfg, image_size)
    if cfg.weights != "none":
        load_backbone_weights(model, cfg.arch, cfg.weights)
    return model


def vgg_stages(features: nn.Sequential) -> tuple[Stage, ...]:
    """The named stages of a torchvision VGG ``features``: each max-pool closes a block."""
    stages: list[Stage] = []
    modules: list[str] = []
    channels = 0
    for index, layer in enumerate(features):
        modules.append(f"features.{index}")
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else channels
        if isinstance(layer, nn.MaxPool2d):
            stages.append(Stage(f"block{len(stages) + 1}", tuple(modules), activation=modules[-2],
                                channels=channels, reduction=2 ** (len(stages) + 1)))
            modules = []
    assert len(stages) == NUM_BLOCKS and not modules, f"not a VGG backbone: {len(stages)} blocks"
    return tuple(stages)


def load_backbone_weights(model: BoneAgeNet, arch: str, weights: str) -> None:
    """Load a torchvision VGG16 state dict (``imagenet``: from the torch hub cache) into the backbone."""
    path = imagenet_weights_path(arch) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise WeightsNotFound(_missing_weights_message(arch, weights, path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"{path} holds no 'features.*' tensors: it is not a torchvision {arch} state dict")
    model.features.load_state_dict(features)


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision keeps (and looks for) the ImageNet weights of ``arch``."""
    url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _missing_weights_message(arch: str, weights: str, path: Path) -> str:
    if weights != "imagenet":
        return f"model.weights={weights}: no such file"
    url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    return (f"ImageNet weights for {arch} are not on this machine and are never downloaded at run time. "
            f"Expected the file {path.name} at {path} (the torch hub cache; TORCH_HOME moves it). Download {url} "
            f"there, or set model.weights=/path/to/{path.name}, or model.weights=none for random initialisation.")

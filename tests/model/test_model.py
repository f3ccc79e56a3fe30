"""The VGG16 regressor: shapes, the pixel convention, the sex input, pretrained weights, named stages, freezing,
parameter groups, and state dicts saved before the stages were named."""

import json
from pathlib import Path

import pytest
import torch
import torchvision

from boneage.config import load_config
from boneage.bundle import weights_mismatch
from boneage.model import NUM_BLOCKS, WeightsNotFound, build_model, imagenet_weights_path


def model_config(*overrides):
    return load_config(overrides=list(overrides)).model


@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
@pytest.mark.parametrize("pooling, size, features", [("avg", 64, 512), ("max", 64, 512), ("flatten", 64, 2048),
                                                     ("flatten", 96, 4608)])
def test_output_shape_for_each_pooling_and_head(arch, pooling, size, features):
    model = build_model(model_config(f"model.arch={arch}", f"model.pooling={pooling}", "model.head=[64, 32]",
                                     "model.sex_embedding=8"), size).eval()
    out = model(torch.rand(3, 1, size, size), torch.tensor([0.0, 1.0, 1.0]))
    assert out.shape == (3,)
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(features + 8, 64), (64, 32), (32, 1)]


def test_no_hidden_layers_is_a_linear_head():
    model = build_model(model_config("model.head=[]"), 64)
    assert [type(m).__name__ for m in model.head] == ["Linear"]


def test_sex_changes_the_prediction_and_learns():
    model = build_model(model_config("model.dropout=0"), 64).eval()
    image = torch.rand(1, 1, 64, 64).expand(2, -1, -1, -1)
    out = model(image, torch.tensor([0.0, 1.0]))
    assert out[0] != out[1]  # same image, different sex: different answer
    out.sum().backward()
    assert model.sex[0].weight.grad.abs().sum() > 0


def test_image_size_must_fit_the_five_pools():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model(model_config(), 100)


def test_weights_from_a_file_path(tmp_path):
    reference = torchvision.models.vgg16()
    path = tmp_path / "my-vgg16.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(model_config("model.arch=vgg16", f"model.weights={path}", "model.pooling=flatten",
                                     "model.head=[]"), 64).eval()
    for mine, theirs in zip(model.features.state_dict().values(), reference.features.state_dict().values()):
        assert torch.equal(mine, theirs)
    # The pretrained backbone sees what it was trained on: the gray image as normalised RGB (g, g, g).
    gray = torch.rand(2, 1, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = reference.features((gray.expand(-1, 3, -1, -1) - mean) / std).flatten(1)
    seen = []
    model.pool.register_forward_hook(lambda module, inputs, output: seen.append(output.flatten(1)))
    model(gray, torch.ones(2))
    assert torch.allclose(seen[0], expected, atol=1e-5)


def test_missing_imagenet_weights_say_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = imagenet_weights_path("vgg16_bn")
    assert expected == tmp_path / "torch" / "hub" / "checkpoints" / "vgg16_bn-6c64b313.pth"
    with pytest.raises(WeightsNotFound) as err:
        build_model(model_config("model.arch=vgg16_bn", "model.weights=imagenet"), 64)
    message = str(err.value)
    assert str(expected) in message and "download.pytorch.org" in message and "model.weights=none" in message
    with pytest.raises(WeightsNotFound, match="no such file"):
        build_model(model_config(f"model.weights={tmp_path / 'nope.pth'}"), 64)


def test_imagenet_weights_load_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = torchvision.models.vgg16()
    path = imagenet_weights_path("vgg16")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_model(model_config("model.arch=vgg16", "model.weights=imagenet"), 64)
    assert torch.equal(model.features[28].weight, reference.features[28].weight)


def test_a_file_that_is_not_a_vgg_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not a torchvision vgg16_bn state dict"):
        build_model(model_config(f"model.weights={path}"), 64)


def stage_modules(model, stage):
    return [model.get_submodule(name) for name in stage.modules]


def test_frozen_blocks_get_no_gradients_and_keep_batchnorm_statistics():
    model = build_model(model_config("model.arch=vgg16_bn"), 64)
    model.freeze_bottom_blocks(3)
    model.train()
    assert len(model.stages) == NUM_BLOCKS and model.frozen_stages() == {"block1", "block2", "block3"}
    first_bn = stage_modules(model, model.stages[0])[1]
    before = first_bn.running_mean.clone()
    model(torch.rand(2, 1, 64, 64), torch.ones(2)).sum().backward()
    assert all(p.grad is None for s in ("block1", "block2", "block3") for p in model.stage_parameters(s))
    assert all(p.grad is not None for s in ("block4", "block5") for p in model.stage_parameters(s))
    assert torch.equal(first_bn.running_mean, before)  # frozen batch norm kept its statistics
    model.freeze_bottom_blocks(0)
    model.train()
    model(torch.rand(2, 1, 64, 64), torch.ones(2)).sum().backward()
    assert all(p.grad is not None for p in model.stage_parameters("block1"))


def test_uint8_images_are_scaled_by_the_model_and_floats_taken_as_unit():
    model = build_model(model_config(), 64).eval()
    stored = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    male = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        assert torch.equal(model(stored, male), model(stored.float() / 255.0, male))
        assert not torch.allclose(model(stored, male), model(stored.float(), male))


@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_stages_are_named_with_their_channels_reduction_and_activation(arch):
    model = build_model(model_config(f"model.arch={arch}"), 64).eval()
    assert [s.name for s in model.stages] == ["block1", "block2", "block3", "block4", "block5"]
    assert [(s.channels, s.reduction) for s in model.stages] == [(64, 2), (128, 4), (256, 8), (512, 16), (512, 32)]
    names = [name for stage in model.stages for name in stage.modules]
    assert names == [f"features.{i}" for i in range(len(model.features))]  # every layer, in order, once
    seen = {}
    for stage in model.stages:
        pool, activation = model.get_submodule(stage.modules[-1]), model.get_submodule(stage.activation)
        assert isinstance(pool, torch.nn.MaxPool2d) and isinstance(activation, torch.nn.ReLU)
        pool.register_forward_hook(lambda m, i, out, name=stage.name: seen.__setitem__(name, out.shape))
    model(torch.rand(1, 1, 64, 64), torch.ones(1))
    assert [seen[s.name] for s in model.stages] == [(1, s.channels, 64 // s.reduction, 64 // s.reduction)
                                                    for s in model.stages]


def test_parameter_groups_cover_every_parameter_once_with_their_rates():
    model = build_model(model_config("model.arch=vgg16_bn"), 64)
    groups = model.parameter_groups(lr=1e-3, backbone_lr_scale=0.1, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["head", "block1", "block2", "block3", "block4", "block5"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3] + [1e-4] * 5)
    assert all(g["weight_decay"] == 0.05 for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert {id(p) for p in groups[0]["params"]} == {id(p) for m in (model.sex, model.head) for p in m.parameters()}


@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_state_dicts_saved_before_the_stages_were_named_still_load_strictly(arch):
    """Bundles hold state dicts: the keys and shapes the model had before its stages were named (recorded from
    that code) must load into today's model as they are."""
    saved = json.loads((Path(__file__).parent / "data" / "state_dict_keys_before_stages.json").read_text())[arch]
    state = {key: torch.randn(shape) if shape else torch.tensor(7) for key, shape in saved.items()}
    model = build_model(model_config(f"model.arch={arch}", "model.head=[16]", "model.sex_embedding=4"), 64)
    assert weights_mismatch(model.state_dict(), state) == ""
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.stage_parameters("block1")[0], state["features.0.weight"])

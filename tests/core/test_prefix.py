"""The frozen prefix / trainable top split of timm models: exact recomposition at every point, frozen prefix,
shared submodules (HAM layers injected after the split are used), errors that list the valid points."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import timm
import torch
from torch import nn

from ham_lightning import HAMConfig, HAMLayer, inject
from ham_lightning.core.prefix import (
    PREFIX_KEY,
    AdaptPoint,
    modules_below,
    multi_prefix,
    prefix_of,
    split_model,
    valid_points,
)
from ham_lightning.core.targets import modules_from

# name, timm kwargs, input size: tiny random models of each supported family
MODELS = {
    "efficientnet": ("tf_efficientnet_lite0", {}, 32),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 32),
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4}, 32),
}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(family: str, num_classes: int = 0) -> tuple[nn.Module, torch.Tensor]:
    name, kwargs, size = MODELS[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_top_of_prefix_is_the_model_at_every_point(family: str) -> None:
    model, x = make(family)
    expected = model(x)
    points = valid_points(model)
    stages = len(model.blocks)
    assert [p for p in points if p.count(".") == 1] == [f"blocks.{i}" for i in range(stages)]
    if family != "vit":
        assert "blocks.1.1" in points  # points inside a stage
    for point in points:
        split = split_model(model, point)
        torch.testing.assert_close(split.top(split.prefix(x)), expected, atol=1e-5, rtol=1e-5, msg=point)


def test_prefix_is_the_activation_at_the_point() -> None:
    model, x = make("efficientnet")
    stem = model.bn1(model.conv_stem(x))
    with torch.no_grad():
        torch.testing.assert_close(split_model(model, "blocks.0").prefix(x), stem)
        torch.testing.assert_close(split_model(model, "blocks.5").prefix(x), model.blocks[:5](stem))
        torch.testing.assert_close(split_model(model, "blocks.5.2").prefix(x), model.blocks[5][:2](model.blocks[:5](stem)))
    assert split_model(model, "blocks.5").prefix(x).shape == (2, 112, 2, 2)  # Lite0 stage 4 output, stride 16
    vit, xv = make("vit")
    assert split_model(vit, "blocks.2").prefix(xv).shape == (2, 1 + 16, 192)  # class token + 4x4 patches
    assert split_model(vit, "blocks.2").prefix_shape(32) == (17, 192)


def test_points_are_canonical_and_bad_points_list_the_valid_ones() -> None:
    model, _ = make("efficientnet")
    assert split_model(model, "blocks.5.0").adapt_from == "blocks.5"
    assert split_model(model, "blocks.5.2").point == AdaptPoint(5, 2)
    for bad in ("blocks.7", "blocks.5.9", "stem", "blocks", "conv_head", "blocks.-1"):
        with pytest.raises(ValueError, match=r"Valid points: \['blocks.0', 'blocks.1', 'blocks.1.1'"):
            split_model(model, bad)
    vit, _ = make("vit")
    with pytest.raises(ValueError, match=r"4 transformer blocks.*\['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3'\]"):
        split_model(vit, "blocks.2.1")  # no points inside a transformer block


def test_unsupported_models_are_named() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(TypeError, match="ResNet is not a supported timm model.*EfficientNet.*VisionTransformer"):
        split_model(resnet, "blocks.1")
    custom = nn.Module()
    custom.blocks = nn.Sequential(nn.Identity())
    with pytest.raises(TypeError, match="Module has a 'blocks' trunk but is not a supported timm model"):
        split_model(custom, "blocks.0")


def test_prefix_runs_frozen_and_restores_modes() -> None:
    model, x = make("efficientnet")
    split = split_model(model, "blocks.5")
    model.train()
    stats = model.bn1.running_mean.clone()
    h = split.prefix(x)
    assert not h.requires_grad
    torch.testing.assert_close(model.bn1.running_mean, stats)  # BatchNorm ran in eval mode
    assert all(m.training for m in model.modules())  # ... and every mode is back as it was
    model.eval()
    torch.testing.assert_close(h, split.prefix(x))


def test_forward_takes_images_or_the_cached_dict() -> None:
    model, x = make("vit")
    split = split_model(model, "blocks.2")
    h = split.prefix(x)
    torch.testing.assert_close(split({PREFIX_KEY: h}), model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split(x), model(x), atol=1e-5, rtol=1e-5)
    assert prefix_of({PREFIX_KEY: h}) is h and prefix_of(x) is None
    with pytest.raises(KeyError, match="'prefix'"):
        split({"image": x})


def test_top_returns_logits_when_the_model_has_a_classifier() -> None:
    model, x = make("mobilenetv3", num_classes=7)
    split = split_model(model, "blocks.3")
    out = split.top(split.prefix(x))
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_modules_below_complement_the_adapted_top(family: str) -> None:
    model, _ = make(family)
    every = {name for name, _ in model.named_modules() if name}
    for point in valid_points(model):
        below, top = modules_below(model, point), modules_from(model, point)
        assert below and not below & top, point
        spanning = every - below - top  # containers holding both halves
        assert spanning <= {"blocks", ".".join(point.split(".")[:2])}, (point, spanning)
    below = modules_below(model, "blocks.2")
    assert "blocks.1" in below and "blocks.2" not in below
    assert any(name.startswith("blocks.1.") for name in below)  # descendants included


def test_prefix_parameters_include_the_vit_embeddings() -> None:
    model, _ = make("vit")
    split = split_model(model, "blocks.1")
    ids = {id(p) for p in split.prefix_parameters()}
    assert {id(model.pos_embed), id(model.cls_token), id(model.patch_embed.proj.weight)} <= ids
    assert id(model.blocks[0].attn.qkv.weight) in ids and id(model.blocks[1].attn.qkv.weight) not in ids
    split.freeze_prefix()
    assert not model.pos_embed.requires_grad and model.blocks[1].attn.qkv.weight.requires_grad


@pytest.mark.parametrize(("family", "targets", "point"), [
    ("efficientnet", ["conv_pw", "conv_pwl", "conv_head"], "blocks.5"),
    ("vit", ["qkv", "fc1", "fc2"], "blocks.2"),
])
def test_ham_layers_injected_after_the_split_are_used_by_top(family: str, targets: list[str], point: str) -> None:
    model, x = make(family)
    split = split_model(model, point)  # split first: it must not hold copies of the submodules
    h = split.prefix(x)
    controller = inject(model, HAMConfig(target_modules=targets, adapt_from=point))
    below = modules_below(model, point)
    assert controller.layers and not below & set(controller.layers)
    assert not any(isinstance(m, HAMLayer) for name, m in model.named_modules() if name in below)
    before = split.top(h)
    with torch.no_grad():
        for p in controller.adapter_parameters():
            p.normal_(0, 0.05)  # a non-zero adapter: the output must move
    moved = split.top(h)
    assert (moved - before).abs().max() > 1e-3
    torch.testing.assert_close(moved, model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.prefix(x), h)  # nothing was adapted below the point
    model.train()
    loss = split.top(h).square().mean()
    loss.backward()
    grads = [p.grad for p in controller.adapter_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(("family", "points"), [
    ("efficientnet", ["blocks.6", "blocks.5", "blocks.5.2", "blocks.1.1"]),
    ("vit", ["blocks.3", "blocks.0", "blocks.2"]),
])
def test_multi_prefix_is_each_prefix_in_one_pass(family: str, points: list[str]) -> None:
    model, x = make(family)
    model.train()
    outs = multi_prefix(model, points)(x)
    assert all(m.training for m in model.modules())
    model.eval()
    for point, out in zip(points, outs, strict=True):
        assert torch.equal(out, split_model(model, point).prefix(x)), point  # bit for bit: same modules, same order

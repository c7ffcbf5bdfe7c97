"""Image transforms built from a backbone's timm data config; they run on uint8 ``C x H x W`` tensors.

Train time (``augment=True``), two standard recipes:

* ``"resized"``: ``RandomResizedCrop(image_size, scale=(0.08, 1))`` + horizontal flip, the timm / L2P / PyCIL
  recipe for pre-trained backbones;
* ``"pad"``: resize to ``image_size`` then ``RandomCrop(image_size, padding=image_size // 8)`` + horizontal flip,
  the CIFAR recipe, for small images at their native scale (the ``digits`` default, without the flip).

Evaluation, and training with ``augment=False``: resize the shorter side to ``floor(image_size / crop_pct)`` and
centre-crop ``image_size`` (timm's eval transform). Both end with ``ToDtype(float32, scale=True)`` and
``Normalize(mean, std)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode, v2

TrainCrop = Literal["resized", "pad"]

INTERPOLATIONS: dict[str, InterpolationMode] = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}

DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class DataConfig:
    """What the transforms need to know about the backbone's input."""

    image_size: int
    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]
    interpolation: str = "bicubic"
    crop_pct: float = DEFAULT_CROP_PCT

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size}.")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={self.mean}, std={self.std}.")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}.")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def backbone_data_config(backbone: str) -> dict[str, Any]:
    """The timm data config (input size, mean, std, interpolation, crop_pct) of ``backbone``, without downloading.

    ``backbone`` is a timm model name, with or without a pretrained tag (``vit_base_patch16_224.augreg_in21k``).
    """
    pretrained_cfg = timm.get_pretrained_cfg(backbone)
    if pretrained_cfg is None:
        base = backbone.split(".")[0]
        if not timm.is_model(base):
            raise ValueError(
                f"backbone={backbone!r} is not a timm model name; see timm.list_models() for the names, "
                "or give image_size, mean and std explicitly."
            )
        raise ValueError(
            f"timm has no data config for backbone={backbone!r}; give image_size, mean and std explicitly."
        )
    return timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())


def resolve_data_config(
    backbone: str | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    default_image_size: int = 224,
    default_crop_pct: float | None = None,
) -> DataConfig:
    """Explicit arguments win over the backbone's timm config, which wins over the defaults.

    Defaults: ImageNet mean/std, bicubic, ``default_image_size`` (the data set's), ``crop_pct`` 0.875 unless the
    data set asks for another one (``digits``: 1.0, its digits touch the border).
    """
    resolved: dict[str, Any] = {
        "image_size": default_image_size,
        "mean": tuple(IMAGENET_DEFAULT_MEAN),
        "std": tuple(IMAGENET_DEFAULT_STD),
        "interpolation": "bicubic",
        "crop_pct": default_crop_pct if default_crop_pct is not None else DEFAULT_CROP_PCT,
    }
    if backbone is not None:
        cfg = backbone_data_config(backbone)
        resolved.update(
            image_size=int(cfg["input_size"][-1]),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=cfg.get("interpolation") if cfg.get("interpolation") in INTERPOLATIONS else "bicubic",
            crop_pct=float(cfg.get("crop_pct", DEFAULT_CROP_PCT)),
        )
    explicit = {"image_size": image_size, "mean": mean, "std": std, "interpolation": interpolation,
                "crop_pct": crop_pct}
    resolved.update({k: v for k, v in explicit.items() if v is not None})
    resolved["mean"] = tuple(float(m) for m in resolved["mean"])
    resolved["std"] = tuple(float(s) for s in resolved["std"])
    return DataConfig(**resolved)


def build_transform(
    config: DataConfig, train: bool, augment: bool = True, crop: TrainCrop = "resized", hflip: bool = True
) -> v2.Compose:
    """The train (``train=True`` and ``augment``) or evaluation transform of a uint8 ``C x H x W`` tensor."""
    size = config.image_size
    interpolation = INTERPOLATIONS[config.interpolation]
    steps: list[Any]
    if train and augment:
        if crop == "resized":
            steps = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interpolation, antialias=True)]
        elif crop == "pad":
            steps = [
                v2.Resize((size, size), interpolation=interpolation, antialias=True),
                v2.RandomCrop(size, padding=max(1, size // 8)),
            ]
        else:
            raise ValueError(f"train_crop must be 'resized' or 'pad', got {crop!r}.")
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps = [
            v2.Resize(math.floor(size / config.crop_pct), interpolation=interpolation, antialias=True),
            v2.CenterCrop(size),
        ]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(config.mean), std=list(config.std))]
    return v2.Compose(steps)

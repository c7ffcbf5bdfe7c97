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

from ham_lightning.core.backbones import backbone_data_config

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

    timm's `resolve_data_config` does the merging; where there is no backbone, the data set's defaults stand in
    for its config: ``default_image_size`` and ``default_crop_pct`` (``digits``: 1.0, its digits touch the
    border), then timm's (ImageNet mean/std, bicubic, ``crop_pct`` 0.875).
    """
    for name, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != 3:  # timm would repeat a single value or assert
            raise ValueError(f"mean and std need 3 values (RGB), got {name}={tuple(value)}.")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:  # timm skips a falsy crop_pct
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    if backbone is not None:
        source = backbone_data_config(backbone)
    else:
        source = {"input_size": (3, default_image_size, default_image_size), "crop_pct": default_crop_pct}
    explicit = {"img_size": image_size, "mean": mean, "std": std, "interpolation": interpolation,
                "crop_pct": crop_pct}
    cfg = timm.data.resolve_data_config(args=explicit, pretrained_cfg=source)
    resolved_interpolation = cfg["interpolation"]
    if interpolation is None and resolved_interpolation not in INTERPOLATIONS:
        resolved_interpolation = "bicubic"  # a backbone's 'random' or 'box': the transforms' default instead
    return DataConfig(
        image_size=int(cfg["input_size"][-1]),
        mean=tuple(float(m) for m in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(s) for s in cfg["std"]),  # type: ignore[arg-type]
        interpolation=resolved_interpolation,
        crop_pct=float(cfg["crop_pct"]),
    )


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

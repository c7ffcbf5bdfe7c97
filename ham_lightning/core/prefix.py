"""A timm model cut at a block into a frozen prefix and a trainable top part.

``split_model(model, "blocks.5")`` names the point where adaptation starts: everything computed before block 5
(the stem and blocks 0-4 of an EfficientNet, the patch embedding and blocks 0-4 of a ViT) is the *prefix*, run
frozen (``no_grad``, eval mode); its output ``h`` depends only on the image, so it can be computed once and cached
(`ham_lightning.data.feature_cache`). The *top* (block 5 onwards, the head) turns ``h`` into what ``model(x)``
returns, so ``split.top(split.prefix(x)) == model(x)`` in eval mode.

The split holds the model, not copies of its parts, and looks its submodules up at every call: HAM layers that
`ham_lightning.inject` puts into the top after the split are used by `PrefixSplit.top`.

Supported: timm's ``EfficientNet`` (EfficientNet, EfficientNet-Lite, MobileNetV2, MnasNet, ...) and
``MobileNetV3`` (MobileNetV3/V4) families, whose ``blocks`` is a Sequential of stages of blocks, with points
``blocks.<stage>`` and ``blocks.<stage>.<block>``; and ``VisionTransformer`` (ViT, DeiT), whose ``blocks`` is a
Sequential of transformer blocks over tokens, with points ``blocks.<i>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.vision_transformer import VisionTransformer
from torch import nn

Family = Literal["efficientnet", "mobilenetv3", "vit"]

#: The key of a batch's input dict that holds cached prefix activations (what the datamodule yields with a
#: prefix cache: ``x = {"prefix": h}``), so a module can tell them from images.
PREFIX_KEY = "prefix"

_FAMILIES: tuple[tuple[type[nn.Module], Family], ...] = (
    (EfficientNet, "efficientnet"),
    (MobileNetV3, "mobilenetv3"),
    (VisionTransformer, "vit"),
)
# Modules a ViT runs before its blocks (forward_features order); pos_embed / cls_token are parameters of the model.
_VIT_EMBED = ("patch_embed", "pos_drop", "patch_drop", "norm_pre")
_CONV_STEM = ("conv_stem", "bn1")


@dataclass(frozen=True)
class AdaptPoint:
    """Where the top part starts: block ``stage`` of ``model.blocks`` (and, for conv nets, block ``block`` of that
    stage; None or 0 means the stage's start)."""

    stage: int
    block: int | None = None

    def __str__(self) -> str:
        return f"blocks.{self.stage}" if not self.block else f"blocks.{self.stage}.{self.block}"


def model_family(model: nn.Module) -> Family:
    """The supported timm family of ``model``; `TypeError` naming the supported ones otherwise."""
    for cls, family in _FAMILIES:
        if isinstance(model, cls):
            return family
    trunk = "has a 'blocks' trunk but is" if isinstance(getattr(model, "blocks", None), nn.Sequential) else "is"
    raise TypeError(
        f"split_model: {type(model).__name__} {trunk} not a supported timm model. Supported: timm's EfficientNet "
        "(efficientnet_*, tf_efficientnet_lite*, mobilenetv2_*, mnasnet_*), MobileNetV3 (mobilenetv3_*, "
        "mobilenetv4_*) and VisionTransformer (vit_*, deit_*) classes, whose trunk is the Sequential 'model.blocks'."
    )


def valid_points(model: nn.Module) -> list[str]:
    """Every ``adapt_from`` value `split_model` accepts for ``model``, in forward order."""
    family = model_family(model)
    blocks: nn.Sequential = model.blocks  # type: ignore[assignment]
    if family == "vit":
        return [f"blocks.{i}" for i in range(len(blocks))]
    points = []
    for s, stage in enumerate(blocks):
        points.append(f"blocks.{s}")
        points += [f"blocks.{s}.{b}" for b in range(1, len(stage))]  # blocks.<s>.0 is accepted as blocks.<s>
    return points


def parse_point(model: nn.Module, adapt_from: str) -> AdaptPoint:
    """``adapt_from`` ("blocks.5", "blocks.5.2") as an `AdaptPoint` of ``model``; `ValueError` listing the valid
    points when it is not one."""
    family = model_family(model)
    blocks: nn.Sequential = model.blocks  # type: ignore[assignment]
    match = re.fullmatch(r"blocks\.(\d+)(?:\.(\d+))?", adapt_from.strip()) if isinstance(adapt_from, str) else None
    point = None
    if match:
        stage, block = int(match.group(1)), match.group(2)
        if stage < len(blocks):
            if block is None:
                point = AdaptPoint(stage)
            elif family != "vit" and int(block) < len(blocks[stage]):
                point = AdaptPoint(stage, int(block) or None)
    if point is None:
        points = valid_points(model)
        shown = points if len(points) <= 40 else points[:20] + ["..."] + points[-5:]
        raise ValueError(
            f"adapt_from={adapt_from!r} is not a point of {type(model).__name__} ({family}, {len(blocks)} "
            f"{'transformer blocks' if family == 'vit' else 'stages'} in model.blocks). Valid points: {shown}."
        )
    return point


@contextmanager
def _eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Put ``modules`` (and their children) in eval mode, restoring every module's own mode afterwards."""
    every = [m for module in modules for m in module.modules()]
    modes = [m.training for m in every]
    try:
        for m in every:
            m.training = False
        yield
    finally:
        for m, mode in zip(every, modes):
            m.training = mode


class PrefixSplit:
    """``model`` cut at ``point``: `prefix` (frozen, ``no_grad``, eval mode) and `top` (the rest of forward).

    Build with `split_model`. Calling the split (`forward`) takes either images or a batch's cached input
    ``{"prefix": h}`` and returns what ``model(x)`` returns.
    """

    def __init__(self, model: nn.Module, point: AdaptPoint, family: Family) -> None:
        self.model = model
        self.point = point
        self.family = family

    @property
    def adapt_from(self) -> str:
        """The canonical name of the point (``blocks.5.0`` is ``blocks.5``): the cache key uses it."""
        return str(self.point)

    def __repr__(self) -> str:
        return f"PrefixSplit({type(self.model).__name__}, adapt_from={self.adapt_from!r})"

    # ---- which modules are where ------------------------------------------------------------------------------

    def prefix_roots(self) -> list[tuple[str, nn.Module]]:
        """The top-most modules computed in the prefix, with their names in ``model``, in forward order."""
        m, p = self.model, self.point
        names = [n for n in (_VIT_EMBED if self.family == "vit" else _CONV_STEM) if hasattr(m, n)]
        roots = [(n, m.get_submodule(n)) for n in names]
        roots += [(f"blocks.{i}", m.blocks[i]) for i in range(p.stage)]
        if p.block:
            roots += [(f"blocks.{p.stage}.{j}", m.blocks[p.stage][j]) for j in range(p.block)]
        return roots

    def prefix_parameters(self) -> list[nn.Parameter]:
        """Parameters the prefix uses: those of its modules, and a ViT's ``cls_token``, ``reg_token``,
        ``pos_embed`` (which `_pos_embed` adds before the blocks)."""
        params = [p for _, module in self.prefix_roots() for p in module.parameters()]
        if self.family == "vit":
            params += [getattr(self.model, n) for n in ("cls_token", "reg_token", "pos_embed")
                       if isinstance(getattr(self.model, n, None), nn.Parameter)]
        return params

    def freeze_prefix(self) -> None:
        """``requires_grad=False`` on every prefix parameter (the prefix never trains; `prefix` runs without
        gradients anyway)."""
        for p in self.prefix_parameters():
            p.requires_grad_(False)

    # ---- the two halves -------------------------------------------------------------------------------------

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Activations at the point for images ``x`` (``B x C x H x W``), under ``no_grad`` with the prefix's
        modules in eval mode (their previous modes are restored)."""
        m, p = self.model, self.point
        with torch.no_grad(), _eval_mode([module for _, module in self.prefix_roots()]):
            if self.family == "vit":
                # By hand: forward_intermediates splits off the class/register tokens and cannot stop before
                # block 0; this is its own embedding sequence (timm's _pos_embed) without that post-processing.
                h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
                return m.blocks[: p.stage](h)
            if not p.block:
                # timm's API: extra_blocks indexes every stage output, 0 being the stem.
                return m.forward_intermediates(x, indices=[p.stage], extra_blocks=True, stop_early=True,
                                               intermediates_only=True)[0]
            # By hand: timm's intermediates stop only at stage ends, not inside a stage.
            h = m.blocks[: p.stage](m.bn1(m.conv_stem(x)))
            return m.blocks[p.stage][: p.block](h)

    def top(self, h: torch.Tensor) -> torch.Tensor:
        """The rest of ``model``'s forward from prefix activations ``h``: the remaining blocks, then what
        ``forward_features`` does after its blocks, then ``forward_head``; gradients flow as usual.

        Written by hand: timm has no forward from an intermediate; these lines mirror each family's
        ``forward_features`` after ``self.blocks(x)`` (grad checkpointing and attention masks are not applied).
        """
        m, p = self.model, self.point
        if p.block:
            h = m.blocks[p.stage][p.block:](h)
            h = m.blocks[p.stage + 1:](h)
        else:
            h = m.blocks[p.stage:](h)
        if self.family == "efficientnet":
            h = m.bn2(m.conv_head(h))
        elif self.family == "vit":
            h = m.norm(h)
        return m.forward_head(h)

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``top(x["prefix"])`` for a cached batch input, ``top(prefix(x))`` for images."""
        if isinstance(x, Mapping):
            if PREFIX_KEY not in x:
                raise KeyError(f"a dict input needs the key {PREFIX_KEY!r} (cached prefix activations); got "
                               f"{sorted(x)}.")
            return self.top(x[PREFIX_KEY])
        return self.top(self.prefix(x))

    __call__ = forward

    def prefix_shape(self, image_size: int | tuple[int, int], in_chans: int | None = None) -> tuple[int, ...]:
        """Shape of ``prefix(x)`` for one image of ``image_size`` (one forward of a zero image)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        chans = in_chans or int(getattr(self.model, "in_chans", 3) or 3)
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return tuple(self.prefix(torch.zeros(1, chans, height, width, device=device, dtype=dtype)).shape[1:])


def canonical_point(adapt_from: str) -> str:
    """A point's canonical name, without a model (``blocks.5.0`` is ``blocks.5``): to compare two settings."""
    return re.sub(r"^(blocks\.\d+)\.0$", r"\1", adapt_from)


def split_model(model: nn.Module, adapt_from: str) -> PrefixSplit:
    """Cut timm ``model`` at ``adapt_from`` ("blocks.5", or "blocks.5.2" inside an EfficientNet/MobileNet stage).

    Raises:
        TypeError: ``model`` is not a supported timm model (names the supported families).
        ValueError: ``adapt_from`` is not a point of ``model`` (lists the valid points).
    """
    family = model_family(model)
    return PrefixSplit(model, parse_point(model, adapt_from), family)


def _trunk_position(split: PrefixSplit) -> int:
    """How many blocks of the flattened trunk (stage by stage, block by block) the prefix runs."""
    blocks = split.model.blocks
    if split.family == "vit":
        return split.point.stage
    return sum(len(stage) for stage in blocks[: split.point.stage]) + (split.point.block or 0)


def _flat_trunk(model: nn.Module, family: Family) -> list[nn.Module]:
    blocks = model.blocks
    return list(blocks) if family == "vit" else [block for stage in blocks for block in stage]


def multi_prefix(model: nn.Module, points: list[str]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """One pass computing the prefix activations at several points (in the order given), e.g. to build the
    caches of ``blocks.5`` and ``blocks.6`` together: each is exactly what its own `PrefixSplit.prefix` returns
    (the same modules run on the same tensors)."""
    splits = [split_model(model, point) for point in points]
    order = sorted(range(len(splits)), key=lambda i: _trunk_position(splits[i]))
    first = splits[order[0]]

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        trunk = _flat_trunk(model, first.family)
        out: list[torch.Tensor | None] = [None] * len(splits)
        h = first.prefix(x)
        at = _trunk_position(first)
        deepest = splits[order[-1]]
        with torch.no_grad(), _eval_mode([module for _, module in deepest.prefix_roots()]):
            for i in order:
                stop = _trunk_position(splits[i])
                for block in trunk[at:stop]:
                    h = block(h)
                at = stop
                out[i] = h
        return out  # type: ignore[return-value]

    return run


def modules_below(model: nn.Module, adapt_from: str) -> set[str]:
    """Names (as in ``model.named_modules()``) of every module computed in the prefix, descendants included.

    Target selection can exclude them: no adapter below the point, so the prefix stays frozen and cacheable.
    Containers that span both halves (``blocks``, and ``blocks.<s>`` for a point inside stage ``s``) are in
    neither `modules_below` nor the top.
    """
    split = split_model(model, adapt_from)
    below: set[str] = set()
    for root, module in split.prefix_roots():
        below.update(root if not name else f"{root}.{name}" for name, _ in module.named_modules())
    return below


def prefix_of(x: Any) -> torch.Tensor | None:
    """The cached activations of a batch input ``{"prefix": h}``, or None for anything else (images)."""
    return x.get(PREFIX_KEY) if isinstance(x, Mapping) else None


__all__ = [
    "PREFIX_KEY",
    "AdaptPoint",
    "PrefixSplit",
    "model_family",
    "modules_below",
    "multi_prefix",
    "parse_point",
    "prefix_of",
    "split_model",
    "valid_points",
]

"""Which modules of a model HAM adapts: PEFT's target-module matching, restricted to what HAM can wrap."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

from torch import nn

from ham_lightning.core.layer import is_adaptable


def _matches(name: str, target_modules: list[str] | str, exclude_modules: list[str] | str | None) -> bool:
    # PEFT's own helper, so `target_modules` / `exclude_modules` mean exactly what they mean in a LoraConfig.
    # Imported here: peft loads transformers, seconds that `import ham_lightning` should not pay.
    from peft.tuners.tuners_utils import check_target_module_exists

    config = SimpleNamespace(
        target_modules=target_modules, exclude_modules=exclude_modules, target_parameters=None,
        modules_to_save=None, layers_to_transform=None, layers_pattern=None,
    )
    return bool(check_target_module_exists(config, name))


def _short_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the modules HAM could adapt, for error messages."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_adaptable(m)})


def modules_from(model: nn.Module, adapt_from: str) -> set[str]:
    """Names of ``adapt_from`` and of every module registered after it (``named_modules`` order): the top part.

    In timm models registration order is forward order (stem, ``blocks.0`` .. ``blocks.N``, head), so
    ``adapt_from="blocks.5"`` selects block 5, the later blocks and the head. Raises if no module has that name.
    """
    names = [name for name, _ in model.named_modules() if name]
    if adapt_from not in names:
        blocks = [n for n in names if n.count(".") == 1 and n.split(".")[0] == "blocks"]
        raise ValueError(
            f"adapt_from={adapt_from!r} names no module of {type(model).__name__}; "
            f"valid block points: {blocks or names[:20]}."
        )
    return set(names[names.index(adapt_from):])


def find_targets(
    model: nn.Module, target_modules: list[str] | str, exclude_modules: list[str] | str | None = None,
    adapt_from: str | None = None,
) -> list[str]:
    """Full names of the modules of ``model`` that HAM adapts, in module order.

    With ``adapt_from``, only modules at and above that block (see `modules_from`) are adapted.

    Raises a ``ValueError`` that lists the adaptable module names when nothing matches, or when an entry of a
    list ``target_modules`` matches no module. Matched modules HAM cannot wrap (a conv with a kernel larger than
    1x1, such as a ViT's ``patch_embed.proj``) are skipped with a warning that names them.
    """
    matched, skipped = [], []
    top = modules_from(model, adapt_from) if adapt_from else None
    for name, module in model.named_modules():
        if name and (top is None or name in top) and _matches(name, target_modules, exclude_modules):
            (matched if is_adaptable(module) else skipped).append(name)
    if isinstance(target_modules, list):
        unmatched = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in matched + skipped)]
        if unmatched:
            raise ValueError(
                f"target_modules {unmatched} match no module of {type(model).__name__}. Adaptable modules "
                f"(nn.Linear, 1x1 nn.Conv2d) are named: {_short_names(model)}."
            )
    if skipped:
        warnings.warn(
            f"HAM skips {len(skipped)} matched module(s) it cannot adapt (only nn.Linear and dense 1x1 nn.Conv2d "
            f"are supported): {skipped[:8]}{' ...' if len(skipped) > 8 else ''}. Name targets more precisely "
            "(e.g. 'attn.proj') or add them to exclude_modules to silence this.",
            stacklevel=3,
        )
    if not matched:
        raise ValueError(
            f"target_modules={target_modules!r} matches no adaptable module of {type(model).__name__}. "
            f"Adaptable modules (nn.Linear, 1x1 nn.Conv2d) are named: {_short_names(model)}."
        )
    return matched

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


def find_targets(
    model: nn.Module, target_modules: list[str] | str, exclude_modules: list[str] | str | None = None
) -> list[str]:
    """Full names of the modules of ``model`` that HAM adapts, in module order.

    Raises a ``ValueError`` that lists the adaptable module names when nothing matches, or when an entry of a
    list ``target_modules`` matches no module. Matched modules HAM cannot wrap (a conv with a kernel larger than
    1x1, such as a ViT's ``patch_embed.proj``) are skipped with a warning that names them.
    """
    matched, skipped = [], []
    for name, module in model.named_modules():
        if name and _matches(name, target_modules, exclude_modules):
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

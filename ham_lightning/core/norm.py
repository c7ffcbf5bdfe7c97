"""Frozen normalisation: BatchNorm running statistics that no call (or skipped call) of ``train()`` can move.

A new ``nn.Module`` is in train mode, and Lightning or a user's loop may call ``model.train()`` at any point, so
putting norm layers in eval mode once (or in an overridden ``train()``) is not enough: design.md section 4 records
a whole task of drift that way. A forward pre-hook on each norm layer switches it to eval mode right before it
runs, whatever the mode of its parents. Written by hand: timm's ``freeze_batch_norm_2d`` swaps in
``FrozenBatchNorm2d`` modules, which changes the state-dict keys (no ``num_batches_tracked``) that PEFT export and
plain timm models expect.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
_HOOK_ATTR = "_ham_frozen_norm_hook"


def _keep_eval(module: nn.Module, args: object) -> None:
    if module.training:
        module.train(False)


def freeze_norm_layers(model: nn.Module) -> int:
    """Keep every BatchNorm layer of ``model`` in eval mode from now on (frozen running statistics).

    Idempotent; returns the number of norm layers frozen. Their affine parameters are left as they are
    (`inject` freezes every backbone parameter anyway).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            module.train(False)
            if getattr(module, _HOOK_ATTR, None) is None:
                handle: RemovableHandle = module.register_forward_pre_hook(_keep_eval)
                object.__setattr__(module, _HOOK_ATTR, handle.id)
            count += 1
    return count

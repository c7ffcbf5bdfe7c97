"""Export a HAM model: the merged delta as a PEFT LoRA adapter, or folded into a plain state dict."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

from ham_lightning.core import algebra
from ham_lightning.core.controller import HAMController, _set_submodule


def plain_model(controller: HAMController) -> nn.Module:
    """A deep copy of the injected model with every HAM layer replaced by its original frozen base (``W0``)."""
    model = copy.deepcopy(controller.model)
    model.__dict__.pop("ham_controller", None)
    for name in controller.layers:
        layer = model.get_submodule(name)
        _set_submodule(model, name, getattr(layer, "base", layer))
    return model


def folded_state_dict(controller: HAMController) -> dict[str, Tensor]:
    """The model's state dict with ``W0 + merged delta`` in each adapted weight, keyed as the bare model."""
    model = plain_model(controller)
    with torch.no_grad():
        for name, layer in controller.layers.items():
            model.get_submodule(name).weight.copy_(layer.merged_weight())
    return model.state_dict()


@torch.no_grad()
def export_peft(controller: HAMController, path: str | Path) -> Path:
    """Write the merged delta (groups and active adapter) as a standard PEFT LoRA adapter in ``path``.

    Each layer's delta is stored exactly, at its own rank, zero-padded to one common rank ``r``; ``lora_alpha = r``
    so PEFT's scaling is 1 and the HAM scaling ``s`` lives in ``lora_B``. Load it with
    ``PeftModel.from_pretrained(plain_timm_model, path)``.
    """
    path = Path(path)
    factors = {}
    for name, layer in controller.layers.items():
        B, A = layer.merged_delta()
        if B.shape[1] > min(B.shape[0], A.shape[1]):
            B, A = algebra.truncate(B.float(), A.float(), min(B.shape[0], A.shape[1]))  # exact: rank <= min dim
        factors[name] = algebra.drop_zero_rank(B.float(), A.float())
    rank = max(1, max(B.shape[1] for B, _ in factors.values()))
    model = plain_model(controller)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(controller.layers), lora_dropout=0.0,
                        bias="none")
    peft_model = get_peft_model(model, config)
    for name, (B, A) in factors.items():
        module = peft_model.base_model.model.get_submodule(name)
        lora_A, lora_B = module.lora_A["default"].weight, module.lora_B["default"].weight
        lora_A.zero_()
        lora_B.zero_()
        k = B.shape[1]
        lora_A[:k] = A.reshape(k, *lora_A.shape[1:]).to(lora_A.dtype)
        lora_B[:, :k] = B.reshape(B.shape[0], k, *lora_B.shape[2:]).to(lora_B.dtype)
    peft_model.save_pretrained(str(path))
    return path

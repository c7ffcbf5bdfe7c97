"""Frozen BatchNorm: no call (or skipped call) of train() lets the running statistics move."""

from __future__ import annotations

import torch
from helpers import tiny_efficientnet
from torch import nn

from ham_lightning import HAMConfig, inject
from ham_lightning.core.norm import freeze_norm_layers


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_inject_keeps_batchnorm_statistics_whatever_calls_train():
    torch.manual_seed(0)
    model = tiny_efficientnet()  # a new module is in train mode
    assert model.training
    before = _bn_buffers(model)
    controller = inject(model, HAMConfig(target_modules=["conv_pw", "conv_pwl"], rank=2, max_groups=2))
    model.train()  # what Lightning or a user's loop does
    opt = torch.optim.SGD(controller.adapter_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
    after = _bn_buffers(model)
    assert before.keys() == after.keys() and len(before) > 40
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # the rest of the model is still in train mode (dropout, drop-path)


def test_freeze_norm_false_lets_statistics_move():
    model = tiny_efficientnet()
    inject(model, HAMConfig(target_modules=["conv_pw"], rank=2, max_groups=1, freeze_norm=False))
    before = _bn_buffers(model)
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(before["bn1.running_mean"], model.state_dict()["bn1.running_mean"])


def test_freeze_norm_layers_is_idempotent_and_counts():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert freeze_norm_layers(model) == 2
    assert freeze_norm_layers(model) == 2
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 2

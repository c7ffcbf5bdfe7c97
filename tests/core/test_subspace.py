"""InputSubspace: a projected adapter leaves earlier inputs' outputs unchanged."""

from __future__ import annotations

import torch
from torch import nn
from toy import One

from ham_lightning import HAMConfig, inject
from ham_lightning.core.subspace import InputSubspace


def test_projected_adapter_does_not_change_outputs_on_old_inputs():
    torch.manual_seed(0)
    model = One(nn.Linear(16, 12))
    ctrl = inject(model, HAMConfig(target_modules=["0"], rank=4, max_groups=2))
    basis = torch.linalg.qr(torch.randn(16, 5))[0]  # old task's inputs live in a 5-dim subspace
    old = torch.randn(200, 5) @ basis.T
    space = InputSubspace(ctrl.layers, energy=0.999)
    with space.collect(), torch.no_grad():
        before = model(old)
    space.update()
    assert space.ranks() == {"0": 5}
    layer = ctrl.layers["0"]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
        assert not torch.allclose(model(old), before, atol=1e-3)  # an unprojected adapter moves them
        space.project_()
        torch.testing.assert_close(model(old), before, atol=1e-4, rtol=1e-4)
        new = torch.randn(10, 16)
        assert (model(new) - nn.functional.linear(new, layer.base.weight, layer.base.bias)).abs().max() > 1e-2


def test_collect_handles_1x1_convs_and_energy_zero_disables():
    model = One(nn.Conv2d(6, 4, 1))
    ctrl = inject(model, HAMConfig(target_modules=["0"], rank=2, max_groups=1))
    space = InputSubspace(ctrl.layers, energy=0.0)
    x = torch.randn(2, 6, 3, 3)
    with space.collect(), torch.no_grad():
        model(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 6).double()
    torch.testing.assert_close(space.moment("0"), rows.T @ rows, rtol=1e-6, atol=1e-5)  # float32 products
    space.update()
    A = ctrl.layers["0"].lora_A.detach().clone()
    space.project_()
    assert torch.equal(ctrl.layers["0"].lora_A, A) and space.ranks() == {"0": 0}


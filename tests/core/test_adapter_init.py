"""`adapter_init="inputs"`: an adapter's ``A`` along its task's own inputs, off the protected subspace."""

from __future__ import annotations

import torch
from torch import nn
from toy import One

from ham_lightning import HAMConfig, inject
from ham_lightning.core.adapter_init import principal_rows


def test_principal_rows_read_the_new_inputs_off_the_protected_subspace():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    old, new_dirs = q[:, :4], q[:, 4:7]  # old inputs in 4 directions; the new task's mostly in 3 others
    x_new = torch.randn(300, 3).double() @ new_dirs.T * 3 + torch.randn(300, 4).double() @ old.T * 5  # and strongly on the old too
    moment = x_new.T @ x_new
    projector = old @ old.T
    rows = principal_rows(moment, 3, projector).double()
    assert rows.shape == (3, 16)
    keep = torch.eye(16, dtype=torch.float64) - projector
    residual = keep @ moment @ keep
    # each row passes the energy a Kaiming-uniform row passes on average (these rows are on strong directions)
    energy = ((rows @ residual) * rows).sum(1)
    torch.testing.assert_close(energy, torch.full((3,), float(torch.trace(residual)) / 16 / 3, dtype=torch.float64))
    assert (rows.norm(dim=1) < 3 ** -0.5).all()
    assert (rows @ old).abs().max() < 1e-5  # nothing on the protected directions
    captured = (rows @ new_dirs).norm() ** 2 / rows.norm() ** 2
    assert captured > 0.999  # all of it on the new task's own directions
    unprotected = principal_rows(moment, 3).double()
    assert (unprotected @ old).norm() ** 2 / unprotected.norm() ** 2 > 0.9  # without P: the old, stronger ones


def test_principal_rows_do_not_depend_on_the_eigensolver_signs(monkeypatch):
    """An eigenvector is defined up to its sign, which differs between solvers and devices: the rows must not."""
    torch.manual_seed(1)
    x = torch.randn(200, 12, dtype=torch.float64) * torch.linspace(3, 0.5, 12, dtype=torch.float64)
    moment = x.T @ x
    expected = principal_rows(moment, 4)
    eigh = torch.linalg.eigh

    def sign_flipped(m):
        vals, vecs = eigh(m)
        return vals, vecs * torch.tensor([(-1.0) ** i for i in range(vecs.shape[1])], dtype=vecs.dtype)

    monkeypatch.setattr(torch.linalg, "eigh", sign_flipped)
    flipped = principal_rows(moment, 4)
    torch.testing.assert_close(flipped, expected, rtol=0, atol=1e-6)


def test_init_adapter_from_inputs_routes_like_training_and_keeps_b_zero():
    torch.manual_seed(0)
    model = One(nn.Linear(8, 6))
    ctrl = inject(model, HAMConfig(target_modules=["0"], rank=2, max_groups=1, adapter_init="inputs"))
    assert ctrl.adapter_is_fresh
    direction = torch.zeros(8)
    direction[3] = 1.0
    x = torch.randn(64, 1) * direction + 0.01 * torch.randn(64, 8)
    ctrl.init_adapter_from_inputs([x[:32], x[32:]], model)
    A = ctrl.layers["0"].lora_A.detach()
    assert A[0].abs().argmax() == 3 and A[0, 3] > 0  # the top row reads the inputs' one strong direction
    assert ctrl.adapter_is_fresh  # B untouched: the delta is still zero
    with torch.no_grad():
        ctrl.layers["0"].lora_B.fill_(1.0)
    assert not ctrl.adapter_is_fresh

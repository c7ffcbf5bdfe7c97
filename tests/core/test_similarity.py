"""The grouping signal: adapters trained on related data score clearly higher than adapters on unrelated data."""

from __future__ import annotations

import torch
from torch import nn

from ham_lightning import HAMConfig, inject
from ham_lightning.core import algebra


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same frozen base for every copy
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _delta(init: str, task: int, target: torch.Tensor, x: torch.Tensor) -> list[algebra.Factors]:
    """Task ``task``'s adapter (its seeded A) trained to move the outputs by ``x @ target``."""
    model = Net()
    ctrl = inject(model, HAMConfig(target_modules=["fc"], rank=4, max_groups=2, adapter_init=init))
    ctrl.reset_adapter(task)
    y = model.fc.base(x).detach() + x @ target
    opt = torch.optim.Adam(ctrl.adapter_parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    return [layer.task_delta() for layer in ctrl.layers.values()]


def _cosines(init: str) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    x, shift, other = torch.randn(256, 16, generator=g), torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    first = _delta(init, 0, 0.3 * shift, x)
    related = _delta(init, 1, 0.3 * (shift + 0.3 * other), x)  # mostly the same change
    unrelated = _delta(init, 1, 0.3 * other, x)
    return float(algebra.cosine(related, first)), float(algebra.cosine(unrelated, first))


def test_shared_init_separates_related_from_unrelated_tasks():
    related, unrelated = _cosines("shared")
    assert related > 0.5 and related > unrelated + 0.3, (related, unrelated)


"""Each new task adapter's ``A`` from the task's own inputs (``HAMConfig.adapter_init="inputs"``).

With ``protect_inputs`` a seeded random ``A`` is projected off the subspace holding most of a slot's earlier
inputs' energy; what is left mostly reads directions the new task's inputs hardly use either (on GTSRB the
accuracy on the task just learned was 64.3% against the frozen head's 56.0%, docs/results.md). InfLoRA chooses
``A`` as the top principal directions of the new task's inputs after projecting off the old ones; PEFT's EVA
init does the same without protection. One pass over the task's data at its start gives each layer's input
moment; the rows come from it (`principal_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from ham_lightning.core.distributed import summed
from ham_lightning.core.layer import HAMLayer
from ham_lightning.core.subspace import InputSubspace, input_moments


def principal_rows(moment: Tensor, rank: int, projector: Tensor | None = None) -> Tensor:
    """``rank`` rows along the top principal directions of an input moment, off ``projector``'s subspace
    (``(I - P) M (I - P)``): where a task's inputs have energy and the protected inputs have little (InfLoRA's
    choice of ``A``; PEFT's EVA init without protection). Each row is scaled so that the inputs' energy through it
    is what a Kaiming-uniform row's would be on average (``tr(M') / (3 in)``), at most a Kaiming row's norm
    (``1/sqrt(3)``): the rows choose where the adapter acts, not how fast it moves (rows of a Kaiming row's norm
    along the top directions acted like a larger learning rate: docs/results.md). Each row's sign is fixed by its
    largest entry, so the result does not depend on the eigensolver."""
    m = moment.double()
    if projector is not None:
        keep = torch.eye(m.shape[0], dtype=m.dtype, device=m.device) - projector.double()
        m = keep @ m @ keep
    m = (m + m.T) / 2
    _, vecs = torch.linalg.eigh(m)  # ascending
    rows = vecs[:, -rank:].flip(1).T.contiguous()
    signs = torch.sign(rows.gather(1, rows.abs().argmax(1, keepdim=True)))
    energy = ((rows @ m) * rows).sum(1)
    target = torch.trace(m) / m.shape[0]
    scale = (target / energy.clamp_min(1e-300)).sqrt().clamp(max=1.0)
    return (rows * signs * scale[:, None] / 3 ** 0.5).float()


@torch.no_grad()
def init_from_inputs(layers: dict[str, HAMLayer], batches: Iterable[Any], forward: Callable[[Any], Any],
                     routes: AbstractContextManager[Any], subspace: InputSubspace | None = None) -> None:
    """Each layer's ``A`` from the inputs ``forward(x)`` of ``batches`` gives it (inside ``routes``: the inputs
    routed as in training), off ``subspace``'s protected directions of its current slot where it has any. Under
    DDP each rank passes its share of the batches and the moments are summed over the ranks, so every rank
    computes the same rows."""
    moments = {name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64,
                                 device=layer.lora_A.device) for name, layer in layers.items()}
    with routes, input_moments(layers, moments), summed(list(moments.values())):
        for x in batches:
            forward(x)
    ranks = subspace.ranks() if subspace is not None and subspace.energy > 0 else {}
    for name, layer in layers.items():
        if moments[name].any():  # else no input reached this layer: keep the seeded draw
            projector = subspace.projector(name) if ranks.get(name, 0) > 0 else None  # type: ignore[union-attr]
            layer.lora_A.copy_(principal_rows(moments[name], layer.rank, projector).to(layer.lora_A))

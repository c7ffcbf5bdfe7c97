"""The statistics pass of a task boundary: one pass over the finished task's training data in eval mode.

It feeds every statistics head (`ham_lightning.core.head.Head` with ``needs_statistics``) the features its
``forward`` is called on, with the batch's labels, then fits it; and, inside the HAM controller's
``collecting_inputs``, it accumulates the layers' input moments of ``protect_inputs``. It runs the module's own
``forward``, so it works on `HAMModule` and on a user's module alike: a statistics head only has to be called in
``forward``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from ham_lightning.core.head import Head


def task_heads(module: nn.Module) -> list[Head]:
    """Every `Head` in ``module`` (the sequence driver's ``start_task`` / ``end_task`` and statistics pass)."""
    return [m for m in module.modules() if isinstance(m, Head)]


@torch.no_grad()
def statistics_pass(pl_module: LightningModule, loader: Iterable[Any], heads: list[Head],
                    collecting: contextlib.AbstractContextManager[Any] | None = None) -> None:
    """``update`` each head of ``heads`` with the features it gets from ``pl_module(x)`` for every ``(x, y)`` of
    ``loader`` (eval mode, no gradient), inside ``collecting`` (the controller's input moments); then ``fit`` it."""
    labels: list[Tensor] = []  # the current batch's labels, read by the hooks
    batches = {id(h): 0 for h in heads}

    def update(head: nn.Module, args: tuple[Any, ...]) -> None:
        head.update(args[0].float(), labels[0])  # type: ignore[operator]
        batches[id(head)] += 1

    handles = [h.register_forward_pre_hook(update) for h in heads]
    was_training = pl_module.training
    pl_module.eval()
    try:
        with collecting if collecting is not None else contextlib.nullcontext():
            for x, y in loader:
                x, y = move_data_to_device((x, y), pl_module.device)
                labels[:] = [y]
                pl_module(x)
    finally:
        for handle in handles:
            handle.remove()
        pl_module.train(was_training)
    idle = [type(h).__name__ for h in heads if batches[id(h)] == 0]
    if idle and labels:  # batches ran, yet these heads were never called
        raise MisconfigurationException(
            f"{', '.join(idle)} got no features in the statistics pass: {type(pl_module).__name__}.forward(x) "
            "never called it. A statistics head is fitted on the features its forward gets: call it in forward "
            "(return self.head(features)) and train with another head (see README, statistics heads)."
        )
    for head in heads:
        head.fit()

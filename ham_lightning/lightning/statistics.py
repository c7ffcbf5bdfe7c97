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
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ham_lightning.core.distributed import check_same, gather_rows, rank_rows, world
from ham_lightning.core.head import Head


def full_order(loader: Iterable[Any]) -> Iterable[Any]:
    """The whole task in the training order, also where ``loader`` is a rank's share (its sampler has
    ``undistributed()``, as `ham_lightning.data.sampler.TaskDistributedSampler`): a statistics pass sees every
    sample once, on every rank."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(loader, DataLoader) and callable(getattr(sampler, "undistributed", None)):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler.undistributed(),
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                          worker_init_fn=loader.worker_init_fn, generator=loader.generator)
    return loader


def rows_of(x: Any, rows: slice) -> Any:
    """Rows ``rows`` of a batch's input: a tensor, or a collection of tensors (cached features)."""
    return apply_to_collection(x, Tensor, lambda t: t[rows])


def task_heads(module: nn.Module) -> list[Head]:
    """Every `Head` in ``module`` not inside another `Head` (the sequence driver's ``start_task`` / ``end_task``
    and statistics pass): a head that holds heads (`GroupedHead`) drives them itself."""
    heads: dict[str, Head] = {}
    for name, m in module.named_modules():
        if isinstance(m, Head) and not any(name.startswith(outer + ".") for outer in heads if outer):
            heads[name] = m
    return list(heads.values())


@torch.no_grad()
def statistics_pass(pl_module: LightningModule, loader: Iterable[Any], heads: list[Head],
                    collecting: contextlib.AbstractContextManager[Any] | None = None) -> None:
    """``update`` each head of ``heads`` with the features it gets from ``pl_module(x)`` for every ``(x, y)`` of
    ``loader`` (eval mode, no gradient), inside ``collecting`` (the controller's input moments); then ``fit`` it.

    Under DDP every rank walks the same batches of the whole task (``loader`` unsharded, see `full_order`), runs
    the forward on its block of each batch's rows, and each head is updated with the whole batch's features
    gathered from the ranks: every rank ends with the heads one process would fit. Sums collected inside
    ``collecting`` (input moments) are added over the ranks by their owner (`ham_lightning.core.distributed`).
    """
    rank, size = world()
    labels: list[Tensor] = []  # the current batch's labels, read by the hooks
    captured: dict[int, Tensor] = {}  # under DDP: this rank's block of each head's features of the batch
    batches = {id(h): 0 for h in heads}

    def update(head: nn.Module, args: tuple[Any, ...]) -> None:
        if size > 1:
            captured[id(head)] = args[0].float()
            return
        head.update(args[0].float(), labels[0])  # type: ignore[operator]
        batches[id(head)] += 1

    handles = [h.register_forward_pre_hook(update) for h in heads]
    was_training = pl_module.training
    pl_module.eval()
    try:
        with collecting if collecting is not None else contextlib.nullcontext():
            for x, y in full_order(loader):
                x, y = move_data_to_device((x, y), pl_module.device)
                labels[:] = [y]
                if size == 1:
                    pl_module(x)
                    continue
                check_same(float((y.double() * torch.arange(1, len(y) + 1, device=y.device)).sum()),
                           "the statistics pass's batches (their labels)")
                rows = rank_rows(len(y), rank, size)
                captured.clear()
                if rows.stop > rows.start:
                    pl_module(rows_of(x, rows))
                for head in heads:  # every rank gathers for every head, in one order
                    features = gather_rows(captured.get(id(head)), y.device)
                    if features.shape[1]:  # else the forward never called this head (the error below)
                        head.update(features, y)  # type: ignore[operator]
                        batches[id(head)] += 1
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

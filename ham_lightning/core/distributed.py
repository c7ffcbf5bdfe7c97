"""Statistics across processes: what a task boundary sums over its data is summed over every rank's share of it.

Under DDP each process sees a share of a task's data. Every statistic a boundary accumulates (input moments of
``protect_inputs``, the router's task sums) is a sum over samples, so each rank sums its share and the shares are
added with one all-reduce; head statistics take the features of whole batches (`gather_rows`), so a head sees
exactly the batches one process would. Everything here is a no-op when ``torch.distributed`` is not initialised
(one process), and uses nothing but ``torch.distributed``: the core stays free of Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["check_same", "gather_rows", "rank_rows", "sum_increments", "summed", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_backend_device(t: Tensor) -> Tensor:
    """NCCL reduces CUDA tensors only: a CPU tensor goes to this rank's GPU and back."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum each tensor over the ranks, in place (every rank gets the same bits)."""
    if world()[1] == 1:
        return
    for t in tensors:
        moved = _on_backend_device(t)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved)


@contextmanager
def sum_increments(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Inside, each rank adds its share to ``tensors`` (running sums over earlier tasks too); on exit, what every
    rank added is summed over the ranks, so each holds ``before + sum of all ranks' increments``."""
    if world()[1] == 1:
        yield
        return
    before = [t.detach().clone() for t in tensors]
    yield
    increments = [t - b for t, b in zip(tensors, before)]
    all_reduce_sum_(increments)
    with torch.no_grad():
        for t, b, inc in zip(tensors, before, increments):
            t.copy_(b + inc)


@contextmanager
def summed(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Inside, each rank fills ``tensors`` (started from zero) with its share; on exit they hold the sum."""
    yield
    all_reduce_sum_(tensors)


def rank_rows(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous block of a batch of ``n`` rows (``torch.tensor_split``'s sizes: they differ by at
    most one, the first ranks take the extra rows; a rank may get none when ``n < world_size``)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def gather_rows(rows: Tensor | None, device: torch.device) -> Tensor:
    """Every rank's ``rows`` (a ``(n_r, d)`` block, or None for none), concatenated in rank order on every rank.

    Blocks may differ in size (padded for the collective, cut after). Called by every rank, in the same order.
    """
    size = world()[1]
    if size == 1:
        assert rows is not None
        return rows
    local = rows.reshape(rows.shape[0], -1).float() if rows is not None else None
    shape = _on_backend_device(torch.tensor([local.shape[0], local.shape[1]] if local is not None else [0, 0],
                                            device=device))
    shapes = [torch.zeros_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    padded = torch.zeros(max(counts), width, dtype=torch.float32, device=local.device if local is not None else device)
    if local is not None and local.shape[0]:
        padded[: local.shape[0]] = local
    padded = _on_backend_device(padded)
    blocks = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(blocks, padded)
    return torch.cat([b[:c] for b, c in zip(blocks, counts)]).to(device)


def check_same(value: float, what: str) -> None:
    """Raise unless every rank holds the same ``value`` (a cheap guard that the ranks walk the same batches)."""
    if world()[1] == 1:
        return
    t = _on_backend_device(torch.tensor([value, -value], dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if float(t[0]) != value or float(-t[1]) != value:
        raise RuntimeError(
            f"The processes disagree on {what}: under DDP every rank must iterate the same task loader in the same "
            "order for the statistics pass. Give the train loader's sampler a seeded torch.Generator (one per task), "
            "or use ham_lightning's ClassIncrementalDataModule."
        )

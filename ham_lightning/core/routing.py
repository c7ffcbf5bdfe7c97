"""Routing: each input goes through the group slot whose tasks' data it resembles (issue 22).

The frozen prefix already tells the domains apart: the pooled activations entering the adapted part (the
``adapt_from`` block) of a traffic sign, a font character and a photo fall in separate regions. `PrefixRouter`
keeps, per task and per group slot, a diagonal Gaussian of those pooled activations (sums, squares, counts).
It gives

* a data similarity between a new task and each slot (the Bhattacharyya coefficient of their Gaussians, in
  [0, 1]; 1 for the same distribution), so that a task joins a slot of its own domain and opens one for a new
  domain (`HAMConfig.similarity_source="data"`);
* a route for every input at inference: the occupied slot of highest likelihood (`HAMConfig.routing`), whose
  delta alone is applied, so tasks of other groups never interfere.

Pure PyTorch; the statistics are buffers, so they live in the model's ``state_dict`` and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: Floor of a per-dimension variance (activations that never vary would give infinite likelihoods).
VAR_FLOOR = 1e-4


def pool(x: Tensor) -> Tensor:
    """``N x D`` from the input of the adapted block: a conv map ``N x C x H x W`` or tokens ``N x L x D``
    averaged over positions; ``N x D`` as is."""
    if x.dim() == 4:
        return x.float().mean(dim=(2, 3))
    if x.dim() == 3:
        return x.float().mean(dim=1)
    return x.float().reshape(x.shape[0], -1)


def gaussian(total: Tensor, squares: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (floored) diagonal variance from float64 sums."""
    n = count.clamp_min(1.0)
    mean = total / n
    var = (squares / n - mean**2).clamp_min(VAR_FLOOR)
    return mean, var


def bhattacharyya(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> float:
    """Bhattacharyya coefficient ``exp(-D_B)`` of two diagonal Gaussians, normalised per dimension so that it
    does not vanish with the dimension: ``exp(-D_B / D)``."""
    v = (v1 + v2) / 2
    distance = 0.125 * ((m1 - m2) ** 2 / v).sum() + 0.5 * (v.log().sum() - 0.5 * (v1.log().sum() + v2.log().sum()))
    return math.exp(-float(distance) / m1.numel())


class _Observed(Exception):
    """Raised by the routing hook once the pooled input is recorded: the rest of the forward is not needed."""


class PrefixRouter(nn.Module):
    """Per-task and per-slot statistics of the pooled inputs of the adapted part, the data similarity of a task
    to each slot, and per-input routes.

    Modes (set by the owner, `HAMController`): ``observe`` records the current task's statistics and stops the
    forward; ``route`` sends each input to its most likely occupied slot; ``fixed`` sends every input to one slot
    (the slot the current task trains on top of), ``-1`` meaning no slot.
    """

    def __init__(self, dim: int, max_groups: int) -> None:
        super().__init__()
        self.dim, self.max_groups = dim, max_groups
        f64 = torch.float64
        self.register_buffer("slot_sum", torch.zeros(max_groups, dim, dtype=f64))
        self.register_buffer("slot_squares", torch.zeros(max_groups, dim, dtype=f64))
        self.register_buffer("slot_count", torch.zeros(max_groups, dtype=f64))
        self.register_buffer("task_sum", torch.zeros(dim, dtype=f64))
        self.register_buffer("task_squares", torch.zeros(dim, dtype=f64))
        self.register_buffer("task_count", torch.zeros((), dtype=f64))
        #: The slot the current task trains on top of and will join (-1: none planned yet).
        self.register_buffer("planned", torch.full((), -1, dtype=torch.long))
        self.mode = "route"

    # -- statistics ---------------------------------------------------------------------------------------------
    def reset_task(self) -> None:
        self.task_sum.zero_()
        self.task_squares.zero_()
        self.task_count.zero_()
        self.planned.fill_(-1)

    @torch.no_grad()
    def observe(self, pooled: Tensor) -> None:
        p = pooled.detach().to(torch.float64)
        self.task_sum += p.sum(0)
        self.task_squares += (p * p).sum(0)
        self.task_count += p.shape[0]

    @property
    def has_task_statistics(self) -> bool:
        return bool(self.task_count > 0)

    def similarities(self, occupied: list[bool]) -> list[float | None]:
        """Data similarity of the current task to every occupied slot (None for free slots)."""
        if not self.has_task_statistics:
            raise RuntimeError("No statistics of the current task: run a pass over its data in observe mode "
                               "(HAMController.observe_task) before asking for data similarities.")
        mt, vt = gaussian(self.task_sum, self.task_squares, self.task_count)
        out: list[float | None] = []
        for g, used in enumerate(occupied):
            if not used or self.slot_count[g] <= 0:
                out.append(None)
                continue
            mg, vg = gaussian(self.slot_sum[g], self.slot_squares[g], self.slot_count[g])
            out.append(bhattacharyya(mt, vt, mg, vg))
        return out

    @torch.no_grad()
    def commit(self, g: int) -> None:
        """Add the current task's statistics to slot ``g`` (the task joined it)."""
        self.slot_sum[g] += self.task_sum
        self.slot_squares[g] += self.task_squares
        self.slot_count[g] += self.task_count

    # -- routes -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def route(self, pooled: Tensor) -> Tensor:
        """``N`` slot indices: the occupied slot whose Gaussian gives each input the highest likelihood (-1 when
        no slot is occupied)."""
        n = pooled.shape[0]
        used = torch.nonzero(self.slot_count > 0).flatten()
        if used.numel() == 0:
            return torch.full((n,), -1, dtype=torch.long, device=pooled.device)
        mean, var = gaussian(self.slot_sum[used], self.slot_squares[used], self.slot_count[used][:, None])
        p = pooled.detach().to(torch.float64)[:, None, :]
        loglik = -0.5 * (((p - mean[None]) ** 2) / var[None] + var.log()[None]).sum(-1)
        return used[loglik.argmax(dim=1)].to(pooled.device)

    def routes_for(self, x: Tensor, training: bool) -> Tensor | None:
        """What the hook hands to the layers for input ``x`` (the adapted block's input)."""
        pooled = pool(x)
        if self.mode == "observe":
            self.observe(pooled)
            raise _Observed
        if training or self.mode == "fixed":
            return torch.full((x.shape[0],), int(self.planned), dtype=torch.long, device=x.device)
        return self.route(pooled)

    @contextmanager
    def observing(self) -> Iterator[None]:
        """Inside: forwards only record the current task's pooled inputs (`run_observed` swallows the stop)."""
        previous, self.mode = self.mode, "observe"
        try:
            yield
        finally:
            self.mode = previous

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_groups={self.max_groups}"


def run_observed(forward: Callable[[], object]) -> None:
    """Run ``forward()`` in observe mode, where the routing hook stops it once the pooled input is recorded."""
    try:
        forward()
    except _Observed:
        pass


def input_dim(block: nn.Module) -> int:
    """Feature size entering ``block``: the input size of its first Linear or Conv2d."""
    for module in block.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
        if isinstance(module, nn.Conv2d):
            return module.in_channels
        base = getattr(module, "base", None)  # a HAM layer
        if isinstance(base, (nn.Linear, nn.Conv2d)):
            return base.in_features if isinstance(base, nn.Linear) else base.in_channels
    raise ValueError(f"cannot tell the input size of {type(block).__name__}: it holds no Linear or Conv2d.")

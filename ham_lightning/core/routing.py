"""Routing: each input goes through the group slot whose tasks' data it resembles (issue 22).

The frozen prefix already tells the domains apart: the pooled activations entering the adapted part (the
``adapt_from`` block) of a traffic sign, a font character and a photo fall in separate regions. `PrefixRouter`
keeps the mean of those pooled activations per task and per group slot, and one within-task covariance shared by
all tasks (the scatter of every task around its own mean). With them it gives

* a data similarity between a new task and each slot: the Bhattacharyya coefficient of two Gaussians with the
  shared covariance, ``exp(-d^2 / 8)`` for the Mahalanobis distance ``d`` of their means (1 for the same mean);
  a task joins a slot of its own domain and opens one for a new domain (`HAMConfig.similarity_source="data"`);
* a route for every input: linear discriminant analysis over the occupied slots (`HAMConfig.routing`), so only
  that slot's delta applies and tasks of other groups never interfere.

Measured on held-out training images of the mixed-domain scenario (docs/method.md): same-domain tasks at
``d^2 <= 12``, cross-domain ones at ``d^2 >= 57``; 99.1% of inputs routed to their own domain's slot.
Pure PyTorch; the statistics are float64 buffers in the model's ``state_dict`` and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Ridge added to the shared covariance, relative to its mean variance, so that it inverts.
SHRINK = 0.1


def pool(x: Tensor) -> Tensor:
    """``N x D`` from the input of the adapted block: a conv map ``N x C x H x W`` or tokens ``N x L x D``
    averaged over positions; ``N x D`` as is."""
    if x.dim() == 4:
        return x.float().mean(dim=(2, 3))
    if x.dim() == 3:
        return x.float().mean(dim=1)
    return x.float().reshape(x.shape[0], -1)


def shrunk(scatter: Tensor, count: Tensor) -> Tensor:
    """The covariance ``scatter / count`` shrunk towards its mean variance (`SHRINK`)."""
    cov = scatter / count.clamp_min(1.0)
    scale = cov.diagonal().mean().clamp_min(1e-12)
    return (1 - SHRINK) * cov + SHRINK * scale * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def bhattacharyya(mean_a: Tensor, mean_b: Tensor, precision: Tensor) -> float:
    """Bhattacharyya coefficient of two Gaussians sharing the covariance whose inverse is ``precision``."""
    d = mean_a - mean_b
    return math.exp(-float(d @ precision @ d) / 8.0)


@dataclass(frozen=True)
class Routes:
    """The slot of every input of one forward (``slots``: ``N`` longs, -1 for none) and, per slot taken, the
    positions of its inputs: computed once per forward by the router's hook and shared by every HAM layer."""

    slots: Tensor
    members: tuple[tuple[int, Tensor], ...]
    #: The one slot every input takes (training: the planned slot), else None: a layer then fuses that slot's
    #: delta into its frozen weight for the call instead of adding it per input.
    whole: int | None = None

    @classmethod
    def of(cls, slots: Tensor) -> Routes:
        values = torch.unique(slots).tolist()  # one host sync per forward, not per layer
        taken = [g for g in values if g >= 0]
        whole = values[0] if len(values) == 1 and values[0] >= 0 else None
        return cls(slots, tuple((g, torch.nonzero(slots == g).flatten()) for g in taken), whole)


def add_routed_groups(layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``y`` plus, for every input of a HAM layer, the delta of its routed slot only: ``s c_g B_g A_g x_n``."""
    route = layer.route
    if route.slots.shape[0] != x.shape[0]:
        raise RuntimeError(f"{route.slots.shape[0]} routes for a batch of {x.shape[0]}: the router's hook must see "
                           "the same batch as the adapted layers (HAMConfig.routing).")
    scales = layer.group_scalars.detach() * layer.scaling
    for g, idx in route.members:
        k = layer._slot_ranks[g]  # the layer's host copy of its slots' ranks: no device sync per layer
        if k == 0:
            continue
        xg = x.index_select(0, idx)
        B = (scales[g] * layer.group_B[:, :k, g]).to(xg.dtype)
        A = layer.group_A[:k, g, :].to(xg.dtype)
        if layer.is_conv:
            base = layer.base
            conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            delta = F.conv2d(F.conv2d(xg, A[:, :, None, None], None, **conv), B[:, :, None, None])
        else:
            delta = F.linear(F.linear(xg, A), B)
        y = y.index_add(0, idx, delta.to(y.dtype))
    return y


def slot_fused_weight(layer: nn.Module, g: int, dtype: torch.dtype) -> Tensor:
    """``W0 + s c_g B_g A_g``: a HAM layer's frozen weight with slot ``g`` fused in, for a call whose every input
    takes slot ``g`` (no gradient, as `add_routed_groups` gives none; a normal tensor even in inference mode, so
    a cached one serves training too)."""
    with torch.inference_mode(False), torch.no_grad():
        k = layer._slot_ranks[g]
        B = layer.group_B[:, :k, g] * (layer.group_scalars[g] * layer.scaling)
        flat = layer.base.weight.reshape(layer.out_features, layer.in_features)
        return torch.addmm(flat.to(B.dtype), B, layer.group_A[:k, g, :]).to(dtype).view_as(layer.base.weight)


class _Observed(Exception):
    """Raised by the routing hook once the pooled input is recorded: the rest of the forward is not needed."""


class PrefixRouter(nn.Module):
    """Per-task and per-slot means of the pooled inputs of the adapted part, their shared within-task covariance,
    the data similarity of a task to each slot, and per-input routes.

    Modes (set through `observing` and the hook's ``training`` flag): ``observe`` records the current task's
    statistics and stops the forward; in training every input goes to the slot the current task trains on top
    of (``planned``, -1: none); otherwise each input goes to its most likely occupied slot.
    """

    def __init__(self, dim: int, max_groups: int) -> None:
        super().__init__()
        self.dim, self.max_groups = dim, max_groups
        f64 = torch.float64
        self.register_buffer("slot_sum", torch.zeros(max_groups, dim, dtype=f64))
        self.register_buffer("slot_count", torch.zeros(max_groups, dtype=f64))
        self.register_buffer("scatter", torch.zeros(dim, dim, dtype=f64))  # of every committed task, around its mean
        self.register_buffer("scatter_count", torch.zeros((), dtype=f64))
        self.register_buffer("task_sum", torch.zeros(dim, dtype=f64))
        self.register_buffer("task_outer", torch.zeros(dim, dim, dtype=f64))
        self.register_buffer("task_count", torch.zeros((), dtype=f64))
        #: The slot the current task trains on top of and will join (-1: none planned).
        self.register_buffer("planned", torch.full((), -1, dtype=torch.long))
        self.mode = "route"
        self._routing: tuple | None = None  # (key, LDA weight, bias), rebuilt when the statistics change

    # -- statistics ---------------------------------------------------------------------------------------------
    def reset_task(self) -> None:
        self.task_sum.zero_()
        self.task_outer.zero_()
        self.task_count.zero_()
        self.planned.fill_(-1)

    @torch.no_grad()
    def observe(self, pooled: Tensor) -> None:
        p = pooled.detach().to(torch.float64)
        self.task_sum += p.sum(0)
        self.task_outer += p.T @ p
        self.task_count += p.shape[0]

    def task_statistics(self) -> list[Tensor]:
        """The current task's sums (what `observe` adds to), summed over the ranks under DDP."""
        return [self.task_sum, self.task_outer, self.task_count]

    @property
    def has_task_statistics(self) -> bool:
        return bool(self.task_count > 0)

    def _task_scatter(self) -> Tensor:
        mean = self.task_sum / self.task_count.clamp_min(1.0)
        return self.task_outer - self.task_count * torch.outer(mean, mean)

    def precision(self, with_task: bool = False) -> Tensor:
        """Inverse of the shared within-task covariance (with the current task's scatter if ``with_task``)."""
        scatter, count = self.scatter, self.scatter_count
        if with_task and self.has_task_statistics:
            scatter, count = scatter + self._task_scatter(), count + self.task_count
        return torch.linalg.inv(shrunk(scatter, count))

    def similarities(self, occupied: list[bool]) -> list[float | None]:
        """Data similarity of the current task to every occupied slot (None for free slots)."""
        if not self.has_task_statistics:
            raise RuntimeError("No statistics of the current task: run a pass over its data in observe mode "
                               "(HAMController.observe_task) before asking for data similarities.")
        precision = self.precision(with_task=True)
        task_mean = self.task_sum / self.task_count
        out: list[float | None] = []
        for g, used in enumerate(occupied):
            if not used or self.slot_count[g] <= 0:
                out.append(None)
                continue
            out.append(bhattacharyya(task_mean, self.slot_sum[g] / self.slot_count[g], precision))
        return out

    @torch.no_grad()
    def commit(self, g: int) -> None:
        """The current task joined slot ``g``: its inputs count in the slot's mean and in the shared covariance."""
        self.scatter += self._task_scatter()
        self.scatter_count += self.task_count
        self.slot_sum[g] += self.task_sum
        self.slot_count[g] += self.task_count
        self._routing = None

    # -- routes -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def route(self, pooled: Tensor) -> Tensor:
        """``N`` slot indices by linear discriminant analysis over the occupied slots (equal priors); -1 when no
        slot is occupied."""
        n = pooled.shape[0]
        used = torch.nonzero(self.slot_count > 0).flatten()
        if used.numel() == 0:
            return torch.full((n,), -1, dtype=torch.long, device=pooled.device)
        key = (self.scatter._version, self.slot_sum._version, self.scatter.data_ptr())
        if getattr(self, "_routing", None) is None or self._routing[0] != key:
            means = self.slot_sum[used] / self.slot_count[used][:, None]
            weight = means @ self.precision()  # (S, D)
            bias = -0.5 * (weight * means).sum(1)
            self._routing = (key, weight, bias)
        _, weight, bias = self._routing
        scores = pooled.detach().to(torch.float64) @ weight.T + bias
        return used[scores.argmax(dim=1)].to(pooled.device)

    def routes_for(self, x: Tensor, training: bool) -> Routes:
        """What the hook hands to the layers for input ``x`` (the adapted block's input)."""
        pooled = pool(x)
        if self.mode == "observe":
            self.observe(pooled)
            raise _Observed
        if training or self.mode == "planned":
            return Routes.of(torch.full((x.shape[0],), int(self.planned), dtype=torch.long, device=x.device))
        return Routes.of(self.route(pooled))

    @contextlib.contextmanager
    def _in_mode(self, mode: str) -> Iterator[None]:
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    def planned_routes(self) -> contextlib.AbstractContextManager[None]:
        """Inside: every input goes to the planned slot, as in training, whatever the module's mode."""
        return self._in_mode("planned")

    def observing(self) -> contextlib.AbstractContextManager[None]:
        """Inside: forwards only record the current task's pooled inputs (`run_observed` swallows the stop)."""
        return self._in_mode("observe")

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

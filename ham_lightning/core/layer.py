"""`HAMLayer`: a frozen Linear or 1x1 Conv2d with pre-allocated group slots and the active task adapter."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ham_lightning.core import algebra
from ham_lightning.core.layer_ops import (
    _AddWithGroupScaleGrad,
    _compute_dtype,
    _HAMLinear,
    _is_compiling,
    _refresh_after_load,
    group_path_costs,
    is_adaptable,
)
from ham_lightning.core.routing import Routes, add_routed_groups, slot_fused_weight

#: How a layer runs its occupied groups while their scalars train; see `HAMLayer.group_path`.
GroupPath = Literal["auto", "lowrank", "merged", "merged_dense"]
GROUP_PATHS: tuple[str, ...] = ("auto", "lowrank", "merged", "merged_dense")

# Bumped by every optimizer step anywhere (one global post-step hook). Fused optimizers (``AdamW(fused=True)``)
# write the parameters without bumping their version counters, so the counters alone would keep a merged
# weight built from the scalars of the previous step.
_optimizer_steps = 0
_step_hook: Any = None


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _install_step_counter() -> None:
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


class HAMLayer(nn.Module):
    """``y = W0 x + s * (sum_g c_g B_g A_g x + a_t B_t A_t x)`` (design.md section 1).

    The slots are fixed-size buffers laid out rank-major (``group_A``: ``R x G x in``, ``group_B``:
    ``out x R x G``), so the first ``r * G`` rank-one terms of all slots are one contiguous slice: all groups are
    ONE low-rank product of rank ``k = r_used * G``. Unused rank rows are zero. The set of parameters never
    changes across tasks: one optimizer, fixed checkpoints, DDP-safe (empty slots still take part in the graph
    through their scalar).

    The groups are frozen for the whole task, so by default their product is merged into the frozen weight,
    ``W_g = W0 + s * B_groups diag(c) A_groups`` (`fused_weight`: one ``out x k x in`` product, cached while
    ``W0``, the slots and the scalars ``c`` are unchanged: across inference calls, for the whole task when ``c``
    is frozen, and rebuilt once per optimizer step while ``c`` trains). While ``c`` needs a gradient the layer
    picks per call the cheapest exact way to give it (`group_path_costs`, from its shape and the rows of the
    input): the rank-``k`` projections beside the merged weight (``merged``), the dense weight gradient beside
    it (``merged_dense``: small layers and 1x1 convs, where ``(in + out) k > in * out``), or no merged weight
    at all (``lowrank``: few rows per step). ``group_path`` forces one (``lowrank`` also for inference).
    A stride-1 1x1 conv runs as the Linear does, on a channels-last view of its input (one hand-written
    Function instead of thin conv calls), so its output is channels-last whatever the input's layout (the ops
    after it run faster so; `.view` on it needs `.reshape`); other 1x1 convs use conv ops.

    The cache is keyed on the tensors' version counters and storages and on a global count of optimizer steps,
    so in-place merges, ``load_state_dict``, optimizer steps (fused ones too) and ``.to()`` invalidate it;
    reading it needs no host-device sync. Writes through ``.data`` bypass the version counters: call
    `refresh` after them. Not twice differentiable (``create_graph`` through a HAM layer raises), except when
    the base weight or bias is made trainable: the layer then runs plain autograd (`_forward_reference`).

    ``importance`` (``a_t``, shape ``()``) and ``group_scalars`` (``c``, shape ``(G,)``) may be Parameters shared
    by every layer of the adapter (``scalar_granularity="adapter"``) or owned by this layer alone.
    """

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        max_groups: int,
        group_rank: int,
        scaling: float,
        importance: nn.Parameter,
        group_scalars: nn.Parameter,
        group_path: GroupPath = "auto",
    ) -> None:
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"HAMLayer wraps nn.Linear or a 1x1 nn.Conv2d with groups=1, got {base}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.is_conv = isinstance(base, nn.Conv2d)
        # Stride 1, no padding, no dilation: the conv is the same linear map at every pixel (`forward`).
        self._pointwise = self.is_conv and tuple(base.stride) == (1, 1) and tuple(base.dilation) == (1, 1) \
            and not isinstance(base.padding, str) and tuple(base.padding) == (0, 0)
        self.in_features = base.in_channels if self.is_conv else base.in_features
        self.out_features = base.out_channels if self.is_conv else base.out_features
        self.rank, self.max_groups, self.group_rank, self.scaling = rank, max_groups, group_rank, scaling
        self.group_path = group_path
        weight = base.weight
        factory = {"device": weight.device, "dtype": torch.float32 if weight.dtype in (torch.float16, torch.bfloat16)
                   else weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.importance = importance
        self.group_scalars = group_scalars
        self.register_buffer("group_A", torch.zeros(group_rank, max_groups, self.in_features, **factory))
        self.register_buffer("group_B", torch.zeros(self.out_features, group_rank, max_groups, **factory))
        self.register_buffer("group_rank_used", torch.zeros(max_groups, dtype=torch.long, device=weight.device))
        self.register_buffer("group_occupied", torch.zeros(max_groups, dtype=torch.bool, device=weight.device))
        # Host-side copy of max(group_rank_used): reading the buffer in forward would sync the device every step.
        self._active_group_rank = 0
        self._slot_ranks = [0] * max_groups
        # (key, W_g): the groups fused into the frozen weight, see `fused_weight`. Not state: never saved.
        self._fused: tuple[tuple, Tensor] | None = None
        #: Per-input group slots (`Routes`, slot -1: none) set for one forward by the controller's router
        #: (`HAMConfig.routing`); None: every group applies to every input (the paper's merged inference).
        self.route: Routes | None = None
        self.register_load_state_dict_post_hook(_refresh_after_load)
        _install_step_counter()

    @property
    def group_path(self) -> str:
        """``auto`` (by cost, per call), or one forced path: ``lowrank``, ``merged``, ``merged_dense``."""
        return self._group_path

    @group_path.setter
    def group_path(self, value: str) -> None:
        if value not in GROUP_PATHS:
            raise ValueError(f"group_path must be one of {GROUP_PATHS}, got {value!r}")
        self._group_path = value

    def refresh(self) -> None:
        """Re-read the slot ranks after the buffers changed (a merge, ``load_state_dict``); drop the fused weight."""
        self._active_group_rank = int(self.group_rank_used.max().item()) if self.max_groups else 0
        self._slot_ranks = [int(k) for k in self.group_rank_used.tolist()]  # host copy: routed forwards read it
        self._fused = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fused"] = None  # pickle and deepcopy: a cache, not state
        return state

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> HAMLayer:
        self._fused = None  # .to(), .cuda(), .half(), ...: the cached weight would be stale (and hold memory)
        return super()._apply(fn, *args, **kwargs)

    # -- factors ------------------------------------------------------------------------------------------------
    def slot_factors(self, g: int) -> algebra.Factors:
        """``(B_g, A_g)`` of slot ``g`` trimmed to its used rank, without the group scalar or ``s``."""
        k = int(self.group_rank_used[g])
        return self.group_B[:, :k, g], self.group_A[:k, g, :]

    def set_slot(self, g: int, B: Tensor, A: Tensor) -> None:
        """Write factors of rank at most ``group_rank`` into slot ``g`` (zeroing the rest)."""
        k = B.shape[1]
        if B.shape[0] != self.out_features or A.shape != (k, self.in_features):
            raise ValueError(f"slot factors must be B: ({self.out_features}, k) and A: (k, {self.in_features}), "
                             f"got B {tuple(B.shape)} and A {tuple(A.shape)}")
        if k > self.group_rank:
            raise ValueError(f"rank {k} exceeds the slot cap {self.group_rank}; truncate first")
        self.group_B[:, :, g].zero_()
        self.group_A[:, g, :].zero_()
        self.group_B[:, :k, g] = B.to(self.group_B.dtype)
        self.group_A[:k, g, :] = A.to(self.group_A.dtype)
        self.group_rank_used[g] = k
        self.group_occupied[g] = True
        self.refresh()

    def task_delta(self) -> algebra.Factors:
        """The active adapter's delta ``a_t B_t A_t`` as factors (``s`` not included)."""
        return self.importance.detach() * self.lora_B.detach(), self.lora_A.detach()

    def group_delta(self, g: int) -> algebra.Factors:
        """Slot ``g``'s effective delta ``E_g = c_g B_g A_g`` as factors (``s`` not included)."""
        B, A = self.slot_factors(g)
        return self.group_scalars.detach()[g] * B, A

    def merged_delta(self, include_active: bool = True) -> algebra.Factors:
        """Level 3 of the hierarchy: ``sum_g c_g B_g A_g (+ a_t B_t A_t)``, times ``s``, as concatenated factors."""
        Bs, As = [], []
        for g in range(self.max_groups):
            if bool(self.group_occupied[g]):
                B, A = self.group_delta(g)
                Bs.append(B)
                As.append(A)
        if include_active:
            B, A = self.task_delta()
            Bs.append(B)
            As.append(A)
        if not Bs:
            return self.group_B.new_zeros(self.out_features, 0), self.group_A.new_zeros(0, self.in_features)
        return self.scaling * torch.cat(Bs, dim=1), torch.cat(As, dim=0)

    def merged_weight(self) -> Tensor:
        """``W0 + s * (sum_g c_g B_g A_g + a_t B_t A_t)`` in the base weight's shape and dtype.

        Releases the cached fused weight: `HAMController.fold` calls this, after which the layer is not run.
        """
        self._fused = None
        B, A = self.merged_delta()
        weight = self.base.weight
        delta = algebra.dense(B, A).to(weight.dtype)
        return weight.detach() + delta.view_as(weight)

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """Fresh task adapter: Kaiming-uniform ``A`` (as LoRA), zero ``B``; the delta starts at zero."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
        A = torch.rand(self.lora_A.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        self.lora_A.copy_(A.to(self.lora_A.device, self.lora_A.dtype))
        self.lora_B.zero_()

    # -- forward ------------------------------------------------------------------------------------------------
    def _low_rank_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``A_all``, ``B_all`` and the per-rank scale vector of the groups and the adapter as one product."""
        A_g, B_g, group_scale = self._group_weights()
        rank_scale = self.importance.expand(self.rank) * self.scaling
        return (torch.cat([A_g, self.lora_A], dim=0), torch.cat([B_g, self.lora_B], dim=1),
                torch.cat([group_scale, rank_scale]))

    def _group_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``A_groups`` (``k x in``), ``B_groups`` (``out x k``) and their per-rank scale ``s * c * occupied``."""
        k = self._active_group_rank * self.max_groups
        A_groups = self.group_A.view(-1, self.in_features)[:k]
        B_groups = self.group_B.view(self.out_features, -1)[:, :k]
        group_scale = (self.group_scalars * self.group_occupied).repeat(self._active_group_rank) * self.scaling
        return A_groups, B_groups, group_scale

    def _fused_key(self, dtype: torch.dtype) -> tuple:
        sources = (self.base.weight, self.group_A, self.group_B, self.group_scalars, self.group_occupied)
        steps = _optimizer_steps if self.group_scalars.requires_grad else None
        return (dtype, self._active_group_rank, steps, *((t.data_ptr(), t._version) for t in sources))

    def _fused_is_current(self, dtype: torch.dtype) -> bool:
        return not _is_compiling() and self._fused is not None and self._fused[0] == self._fused_key(dtype)

    @torch.no_grad()
    def fused_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W0 + s * sum_g c_g B_g A_g``: the frozen weight with every group fused in (no active adapter).

        Cached until ``W0``, a slot, an occupancy flag or a group scalar changes (their version counters and
        storages, and the optimizer steps taken, are the key), or the compute dtype changes. Under
        ``torch.compile`` it is rebuilt by the traced graph on every call.
        """
        weight = self.base.weight
        dtype = dtype or weight.dtype
        if _is_compiling():  # no Python-side cache inside a traced graph
            return self._build_fused(dtype)
        key = self._fused_key(dtype)
        if self._fused is not None and self._fused[0] == key:
            return self._fused[1]
        # A normal tensor, usable by training after an inference-mode call (inference_mode(False) turns grad
        # mode back on: no_grad after it, or the scalars' gradient would also flow through the merged weight).
        with torch.inference_mode(False), torch.no_grad():
            fused = self._build_fused(dtype)
        self._fused = (key, fused)
        return fused

    def _build_fused(self, dtype: torch.dtype) -> Tensor:
        weight = self.base.weight
        A, B, scale = self._group_weights()
        flat = weight.reshape(self.out_features, self.in_features)
        return torch.addmm(flat.to(B.dtype), B * scale, A).to(dtype).view_as(weight)

    def _plan(self, tokens: int, dtype: torch.dtype) -> tuple[str, bool]:
        """The path of this call and whether the group scalars need a gradient.

        Paths: ``single`` (no occupied group), ``lowrank``, ``merged``, ``merged_dense`` (see the class).
        """
        k = self._active_group_rank * self.max_groups
        if k == 0 or self.route is not None:  # routed: the groups are added per input (`add_routed_groups`)
            return "single", False
        c_grad = torch.is_grad_enabled() and self.group_scalars.requires_grad
        path = self._group_path
        if path == "auto":
            if not c_grad:
                return "merged", False  # built once and reused while c is constant
            costs = group_path_costs(self.in_features, self.out_features, k, tokens,
                                     rebuild=not self._fused_is_current(dtype))
            path = min(costs, key=costs.__getitem__)
        return path, c_grad

    def _base_trains(self) -> bool:
        return any(p.requires_grad for p in self.base.parameters())

    def forward(self, x: Tensor) -> Tensor:
        y = self._forward(x)
        if self.route is not None and self._active_group_rank and (self._base_trains() or self._whole_slot() is None):
            y = add_routed_groups(self, x, y)
        return y

    def _whole_slot(self) -> int | None:
        """The occupied slot every input of this routed call takes (training: the planned one), else None."""
        g = None if self.route is None else self.route.whole
        return g if g is not None and self._slot_ranks[g] > 0 else None

    def _frozen_weight(self, dtype: torch.dtype) -> Tensor:
        """The frozen weight of the ``single`` path: ``W0``, or with every input routed to one slot ``W0 + s c_g
        B_g A_g`` (no gradient, as `add_routed_groups` gives none), cached like `fused_weight` (a task's steps all
        take its planned slot), where adding the slot per input costs two rank-``k`` products over every input."""
        g = self._whole_slot()
        if g is None:
            return self.base.weight
        key = ("slot", g, self._slot_ranks[g], self._fused_key(dtype))
        if self._fused is not None and self._fused[0] == key and not _is_compiling():
            return self._fused[1]
        weight = slot_fused_weight(self, g, dtype)
        if not _is_compiling():
            self._fused = (key, weight)
        return weight

    def _forward(self, x: Tensor) -> Tensor:
        if self._base_trains():
            return self._forward_reference(x)
        if self.is_conv:
            if not self._pointwise or x.dim() != 4:
                return self._forward_conv(x)
            # A stride-1 1x1 conv is a linear map of each pixel: one fused matmul Function over a channels-last
            # view runs the frozen weight and the adapter together (fewer, larger ops than three thin conv2d calls).
            return self._forward_linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._forward_linear(x)

    def _forward_linear(self, x: Tensor) -> Tensor:
        """The layer on inputs whose last dimension is ``in_features`` (tokens of a Linear, pixels of a 1x1 conv)."""
        base = self.base
        dtype = _compute_dtype(x, base.weight.dtype)
        rank_scale = self.importance.expand(self.rank) * self.scaling
        path, c_grad = self._plan(x.numel() // self.in_features, dtype)
        A_g = B_g = None
        if path == "single":
            # Keep the group scalars in the graph so DDP sees every parameter used (their grad is zero).
            scale = rank_scale + 0.0 * self.group_scalars.sum()
            weight = self._frozen_weight(dtype)
        else:
            weight = base.weight if path == "lowrank" else self.fused_weight(dtype)
            scale = rank_scale
            if path == "lowrank" or c_grad:
                A_g, B_g, group_scale = self._group_weights()
                A_g, B_g = A_g.to(dtype), B_g.to(dtype)
                scale = torch.cat([group_scale, rank_scale])
        bias = None if base.bias is None else base.bias.to(dtype)
        weight = weight.reshape(self.out_features, self.in_features)  # a 1x1 conv's (out, in, 1, 1) too
        return _HAMLinear.apply(x.to(dtype), weight.to(dtype), bias, A_g, B_g, self.lora_A.to(dtype),
                                self.lora_B.to(dtype), scale, path)

    def _forward_conv(self, x: Tensor) -> Tensor:
        """Strided, padded or dilated 1x1 convolutions: the same arithmetic through conv ops, and the same paths."""
        base = self.base
        conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        rank_scale = self.importance.expand(self.rank) * self.scaling
        pixels = [(n + 2 * p - 1) // s + 1 for n, p, s in zip(x.shape[-2:], base.padding, base.stride)]
        tokens = (x.numel() // (self.in_features * x.shape[-2] * x.shape[-1])) * pixels[0] * pixels[1]
        dtype = _compute_dtype(x, base.weight.dtype)
        path, c_grad = self._plan(tokens, dtype)
        if path == "single":
            rank_scale = rank_scale + 0.0 * self.group_scalars.sum()  # DDP: every parameter in the graph
            y_frozen = base(x) if self._whole_slot() is None else F.conv2d(
                x, self._frozen_weight(x.dtype), base.bias, **conv)
        elif path == "lowrank":
            A_g, B_g, group_scale = self._group_weights()
            h = F.conv2d(x, A_g.to(x.dtype)[:, :, None, None], None, **conv)
            y_groups = F.conv2d(h * group_scale.to(h.dtype)[None, :, None, None], B_g.to(x.dtype)[:, :, None, None])
            y_frozen = base(x) + y_groups
        else:
            y_frozen = F.conv2d(x, self.fused_weight(dtype), base.bias, **conv)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        h = F.conv2d(x, A[:, :, None, None], None, **conv)
        y_active = F.conv2d(h * rank_scale.to(h.dtype)[None, :, None, None], B[:, :, None, None])
        if path in ("single", "lowrank") or not c_grad:
            return y_frozen + y_active
        A_g, B_g, group_scale = self._group_weights()
        if path == "merged":  # the group scales' gradient needs the projection A_groups x (see the Function)
            with torch.no_grad():
                saved = F.conv2d(x, A_g.to(x.dtype)[:, :, None, None], None, **conv)
        else:
            saved = x.detach()
        return _AddWithGroupScaleGrad.apply(y_frozen, y_active, saved, A_g, B_g, group_scale, path, conv)

    def _forward_reference(self, x: Tensor) -> Tensor:
        """Plain autograd over the dense delta: used when the base weight or bias trains (the fast paths give them
        no gradient), and twice differentiable."""
        base = self.base
        A_g, B_g, group_scale = self._group_weights()
        if self.route is not None:  # routed: the groups are added per input after this (`_routed_groups`)
            group_scale = group_scale * 0.0
        delta = (B_g * group_scale) @ A_g + (self.lora_B * (self.importance * self.scaling)) @ self.lora_A
        weight = base.weight + delta.to(base.weight.dtype).view_as(base.weight)
        if self.is_conv:
            return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)
        return F.linear(x, weight, base.bias)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, max_groups={self.max_groups}, group_rank={self.group_rank}, "
                f"scaling={self.scaling:g}, group_path={self.group_path}")

"""`HAMLayer`: a frozen Linear or 1x1 Conv2d with pre-allocated group slots and the active task adapter."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ham_lightning.core import algebra


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


def _compute_dtype(x: Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a product of ``x`` with a ``weight_dtype`` weight runs in (autocast's, when it is on)."""
    if weight_dtype == torch.float32:
        try:
            enabled = torch.is_autocast_enabled(x.device.type)
            if enabled:
                return torch.get_autocast_dtype(x.device.type)
        except TypeError:  # torch < 2.4: the device-less API
            if x.device.type == "cuda" and torch.is_autocast_enabled():
                return torch.get_autocast_gpu_dtype()
            if x.device.type == "cpu" and torch.is_autocast_cpu_enabled():
                return torch.get_autocast_cpu_dtype()
    return weight_dtype


class _AddWithGroupScaleGrad(torch.autograd.Function):
    """``y_frozen + y_active`` for 1x1 convolutions, whose backward also yields the groups' per-rank scales' grad.

    The groups' delta is fused into the frozen weight that produced ``y_frozen``, so autograd cannot see the
    scales there. Their gradient is ``d scale_j = sum_pixels (B_groups^T dy)_j * h_j`` with ``h = A_groups x``
    (computed in the forward without autograd). Written by hand for the reason given in `_HAMLinear`.
    """

    @staticmethod
    def forward(ctx: Any, y_frozen: Tensor, y_active: Tensor, h: Tensor, B: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(h, B)
        ctx.scale_dtype = scale.dtype
        return y_frozen + y_active

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        h, B = ctx.saved_tensors
        g = F.conv2d(dy, B.t().to(dy.dtype)[:, :, None, None])
        acc = torch.promote_types(dy.dtype, torch.float32)  # bf16 products, summed in float32 (float64 stays)
        d_scale = (g * h.to(dy.dtype)).sum(dim=(0, 2, 3), dtype=acc)
        return dy, dy, None, None, d_scale.to(ctx.scale_dtype)


class _HAMLinear(torch.autograd.Function):
    """The whole HAM linear layer: ``y = x W^T + b + (x A_t^T * s_t) B_t^T`` with the groups fused in ``W``.

    With group factors (``A_g``: ``k x in``, ``B_g``: ``out x k``; only while the group scales need a gradient)
    the first ``k`` entries of ``scale`` are the groups' per-rank scales and the last ``r`` the active adapter's.
    The groups' and the active adapter's projections run as ONE product of rank ``k + r`` each way
    (``x [A_g; A_t]^T`` forward, ``dy [B_g, B_t]`` backward): the rank-``r`` products alone are thin and run far
    below the matrix units' rate, so the group scales' gradient costs little more than the adapter's own. No
    weight gradient of the frozen ``W`` or group factors is formed. Written by hand because autograd would
    compute the group factors' weight gradients (``dy^T h``, ``dh^T x``) and throw them away.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A_g: Tensor | None,
                B_g: Tensor | None, A_t: Tensor, B_t: Tensor, scale: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # inputs come cast to the compute dtype
            x2 = x.reshape(-1, x.shape[-1])
            k = 0 if A_g is None else A_g.shape[0]
            A = A_t if A_g is None else torch.cat([A_g, A_t])
            h = x2 @ A.t()
            u = h[:, k:] * scale[k:].to(h.dtype)
            y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
            y.addmm_(u, B_t.t())
        ctx.save_for_backward(x2, weight, h, A, B_g, B_t, scale)
        ctx.k, ctx.x_shape = k, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, h, A, B_g, B_t, scale = ctx.saved_tensors
        k = ctx.k
        needs_x, needs_A, needs_B, needs_scale = (ctx.needs_input_grad[i] for i in (0, 5, 6, 7))
        dy2 = dy.reshape(-1, dy.shape[-1])
        B = B_t if B_g is None else torch.cat([B_g, B_t], dim=1)
        g = dy2 @ B  # (N, k + r)
        s = scale.to(g.dtype)
        g_t = g[:, k:] * s[k:]
        d_x = d_A = d_B = d_scale = None
        if needs_scale:
            acc = torch.promote_types(g.dtype, torch.float32)  # bf16 products, summed in float32
            d_scale = (g * h).sum(0, dtype=acc).to(scale.dtype)
        if needs_A:
            d_A = g_t.t() @ x2
        if needs_B:
            d_B = dy2.t() @ (h[:, k:] * s[k:])
        if needs_x:
            d_x = (dy2 @ weight).addmm_(g_t, A[k:]).view(ctx.x_shape)
        return d_x, None, None, None, None, d_A, d_B, d_scale


def is_adaptable(module: nn.Module) -> bool:
    """Whether HAM can wrap ``module``: an ``nn.Linear`` or a dense (groups=1) 1x1 ``nn.Conv2d``."""
    if type(module) is nn.Linear:
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


class HAMLayer(nn.Module):
    """``y = W0 x + s * (sum_g c_g B_g A_g x + a_t B_t A_t x)`` (design.md section 1).

    The slots are fixed-size buffers laid out rank-major (``group_A``: ``R x G x in``, ``group_B``:
    ``out x R x G``), so the first ``r * G`` rank-one terms of all slots are one contiguous slice: all groups are
    ONE low-rank product of rank ``k = r_used * G`` (`_low_rank_weights` gives it with the active adapter).
    Unused rank rows are zero. The set of parameters never changes across tasks: one optimizer, fixed
    checkpoints, DDP-safe (empty slots still take part in the graph through their scalar).

    Forward: the groups are frozen for the whole task, so their product is fused into the frozen weight,
    ``W_g = W0 + s * B_groups diag(c) A_groups`` (one ``out x k x in`` product, cached while ``W0``, the slots and
    the scalars ``c`` are unchanged: across inference calls, and rebuilt once per optimizer step while ``c``
    trains). The step then costs the single-adapter step plus, only while ``c`` needs a gradient, the rank-``k``
    projections ``A_groups x`` (forward) and ``B_groups^T dy`` (backward) that give that gradient, run in one
    product with the active adapter's own (`_HAMLinear`). The cache is keyed on the tensors' version counters and
    storage, so in-place merges, ``load_state_dict``, optimizer steps and ``.to()`` invalidate it; reading it
    needs no host-device sync. Not twice differentiable (``create_graph`` through a HAM layer raises).

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
    ) -> None:
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"HAMLayer wraps nn.Linear or a 1x1 nn.Conv2d with groups=1, got {base}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.is_conv = isinstance(base, nn.Conv2d)
        self.in_features = base.in_channels if self.is_conv else base.in_features
        self.out_features = base.out_channels if self.is_conv else base.out_features
        self.rank, self.max_groups, self.group_rank, self.scaling = rank, max_groups, group_rank, scaling
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
        # (key, W_g): the groups fused into the frozen weight, see `fused_weight`. Not state: never saved.
        self._fused: tuple[tuple, Tensor] | None = None
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh())

    def refresh(self) -> None:
        """Re-read the slot ranks after the buffers changed (a merge, ``load_state_dict``); drop the fused weight."""
        self._active_group_rank = int(self.group_rank_used.max().item()) if self.max_groups else 0
        self._fused = None

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
        """``A_all``, ``B_all`` and the per-rank scale vector of the single low-rank product."""
        k = self._active_group_rank * self.max_groups
        rank_scale = self.importance.expand(self.rank)
        if k == 0:
            # Keep the group scalars in the graph so DDP sees every parameter used (their grad is zero).
            rank_scale = rank_scale + 0.0 * self.group_scalars.sum()
            return self.lora_A, self.lora_B, rank_scale * self.scaling
        A_groups = self.group_A.view(-1, self.in_features)[:k]
        B_groups = self.group_B.view(self.out_features, -1)[:, :k]
        group_scale = (self.group_scalars * self.group_occupied).repeat(self._active_group_rank)
        A_all = torch.cat([A_groups, self.lora_A], dim=0)
        B_all = torch.cat([B_groups, self.lora_B], dim=1)
        return A_all, B_all, torch.cat([group_scale, rank_scale]) * self.scaling

    def _group_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``A_groups`` (``k x in``), ``B_groups`` (``out x k``) and their per-rank scale ``s * c * occupied``."""
        k = self._active_group_rank * self.max_groups
        A_groups = self.group_A.view(-1, self.in_features)[:k]
        B_groups = self.group_B.view(self.out_features, -1)[:, :k]
        group_scale = (self.group_scalars * self.group_occupied).repeat(self._active_group_rank) * self.scaling
        return A_groups, B_groups, group_scale

    @torch.no_grad()
    def fused_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W0 + s * sum_g c_g B_g A_g``: the frozen weight with every group fused in (no active adapter).

        Cached until ``W0``, a slot, an occupancy flag or a group scalar changes (their version counters and
        storages are the key), or the compute dtype or inference mode changes.
        """
        weight = self.base.weight
        dtype = dtype or weight.dtype
        sources = (weight, self.group_A, self.group_B, self.group_scalars, self.group_occupied)
        compiling = _is_compiling()  # traced graphs rebuild it: no Python-side cache inside a graph
        if not compiling:
            key = (dtype, self._active_group_rank, torch.is_inference_mode_enabled(),
                   *((t.data_ptr(), t._version) for t in sources))
            if self._fused is not None and self._fused[0] == key:
                return self._fused[1]
        A, B, scale = self._group_weights()
        flat = weight.reshape(self.out_features, self.in_features)
        fused = torch.addmm(flat.to(B.dtype), B * scale, A).to(dtype).view_as(weight)
        if not compiling:
            self._fused = (key, fused)
        return fused

    def forward(self, x: Tensor) -> Tensor:
        if self.is_conv:
            return self._forward_conv(x)
        base = self.base
        dtype = _compute_dtype(x, base.weight.dtype)
        rank_scale = self.importance.expand(self.rank) * self.scaling
        k = self._active_group_rank * self.max_groups
        A_g = B_g = None
        if k == 0:
            # Keep the group scalars in the graph so DDP sees every parameter used (their grad is zero).
            scale = rank_scale + 0.0 * self.group_scalars.sum()
            weight = base.weight
        else:
            weight = self.fused_weight(dtype)
            scale = rank_scale
            if torch.is_grad_enabled() and self.group_scalars.requires_grad:
                A_g, B_g, group_scale = self._group_weights()
                A_g, B_g = A_g.to(dtype), B_g.to(dtype)
                scale = torch.cat([group_scale, rank_scale])
        bias = None if base.bias is None else base.bias.to(dtype)
        return _HAMLinear.apply(x.to(dtype), weight.to(dtype), bias, A_g, B_g, self.lora_A.to(dtype),
                                self.lora_B.to(dtype), scale)

    def _forward_conv(self, x: Tensor) -> Tensor:
        """1x1 convolutions: the same arithmetic through conv ops (groups fused in the weight as for Linear)."""
        base = self.base
        rank_scale = self.importance.expand(self.rank) * self.scaling
        k = self._active_group_rank * self.max_groups
        if k == 0:
            rank_scale = rank_scale + 0.0 * self.group_scalars.sum()  # DDP: every parameter in the graph
            y_frozen = base(x)
        else:
            weight = self.fused_weight(_compute_dtype(x, base.weight.dtype))
            y_frozen = F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        h = F.conv2d(x, A[:, :, None, None], None, base.stride, base.padding, base.dilation)
        y_active = F.conv2d(h * rank_scale.to(h.dtype)[None, :, None, None], B[:, :, None, None])
        if k == 0 or not (torch.is_grad_enabled() and self.group_scalars.requires_grad):
            return y_frozen + y_active
        A_groups, B_groups, group_scale = self._group_weights()
        with torch.no_grad():  # the group scales' gradient needs the projection A_groups x (see the Function)
            h = F.conv2d(x, A_groups.to(x.dtype)[:, :, None, None], None, base.stride, base.padding,
                         base.dilation)
        return _AddWithGroupScaleGrad.apply(y_frozen, y_active, h, B_groups, group_scale)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, max_groups={self.max_groups}, group_rank={self.group_rank}, "
                f"scaling={self.scaling:g}")

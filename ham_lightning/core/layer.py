"""`HAMLayer`: a frozen Linear or 1x1 Conv2d with pre-allocated group slots and the active task adapter."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ham_lightning.core import algebra

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


def _refresh_after_load(module: HAMLayer, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook (a module-level function, so that a whole model still pickles)."""
    module.refresh()


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


def group_path_costs(in_features: int, out_features: int, k: int, tokens: int, rebuild: bool) -> dict[str, int]:
    """Multiply-adds one training step spends on ``k`` occupied rank-one group terms whose scalars train.

    * ``lowrank``: the groups as a rank-``k`` product in the forward and in the input gradient;
    * ``merged``: the groups merged into the frozen weight (rebuilt after each optimizer step), the scalars'
      gradient from the rank-``k`` projections ``A_groups x`` and ``B_groups^T dy``;
    * ``merged_dense``: merged as well, the scalars' gradient contracted from the dense weight gradient
      ``dy^T x`` (what pays for small layers, where ``(in + out) k > in * out``).

    ``tokens``: rows of the layer's input per step (pixels for a 1x1 conv). The single adapter's own work and
    the frozen product are the same on every path, so they are left out.
    """
    dense, thin = in_features * out_features, (in_features + out_features) * k
    build = dense * k if rebuild else 0
    return {"merged": thin * tokens + build, "lowrank": 2 * thin * tokens,
            "merged_dense": dense * tokens + dense * k + build}


class _HAMLinear(torch.autograd.Function):
    """The whole HAM linear layer: ``y = x W^T + b + (x A^T * scale) B^T``, one product of rank ``k + r`` each way.

    ``scale`` holds the ``k`` groups' per-rank scales, then the ``r`` active adapter's. By ``mode``:

    * ``lowrank``: ``W`` is ``W0``; the groups run in the same low-rank product as the adapter;
    * ``merged``: ``W`` has the groups merged in; their projections ``x A_g^T`` and ``dy B_g`` run with the
      adapter's own only to give the scalars' gradient (``A_g``/``B_g`` are None when it is not needed);
    * ``merged_dense``: as ``merged``, the scalars' gradient from the dense ``dy^T x``.

    Written by hand because autograd would form the weight gradients of the concatenated factors (``dy^T h``,
    ``dh^T x``) for the frozen group factors too, and could not run the merged weight and the scalars' gradient
    as one. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A_g: Tensor | None,
                B_g: Tensor | None, A_t: Tensor, B_t: Tensor, scale: Tensor, mode: str) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # inputs come cast to the compute dtype
            x2 = x.reshape(-1, x.shape[-1])
            k = 0 if A_g is None else A_g.shape[0]
            project = k > 0 and mode != "merged_dense"
            A = torch.cat([A_g, A_t]) if project else A_t
            h = x2 @ A.t()
            s = scale.to(h.dtype)
            y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
            if mode == "lowrank" and k:
                y.addmm_(h * s, torch.cat([B_g, B_t], dim=1).t())
            else:
                y.addmm_(h[:, h.shape[1] - A_t.shape[0]:] * s[k:], B_t.t())
        ctx.save_for_backward(x2, weight, h, A, A_g, B_g, B_t, scale)
        ctx.k, ctx.mode, ctx.project, ctx.x_shape = k, mode, project, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, h, A, A_g, B_g, B_t, scale = ctx.saved_tensors
        k, mode, project = ctx.k, ctx.mode, ctx.project
        r = B_t.shape[1]
        needs_x, needs_A, needs_B, needs_scale = (ctx.needs_input_grad[i] for i in (0, 5, 6, 7))
        dy2 = dy.reshape(-1, dy.shape[-1])
        g = dy2 @ (torch.cat([B_g, B_t], dim=1) if project else B_t)  # (N, k + r) or (N, r)
        s = scale.to(g.dtype)
        s_h = s if project else s[k:]  # the scales of h's columns
        acc = torch.promote_types(g.dtype, torch.float32)  # bf16 products, summed in float32 (float64 stays)
        d_x = d_A = d_B = d_scale = None
        if needs_scale:
            d_scale = (g * h).sum(0, dtype=acc)
            if mode == "merged_dense" and k:
                dW = (dy2.t() @ x2).to(acc)  # out x in: cheaper than the projections for small layers
                d_groups = ((B_g.t().to(acc) @ dW) * A_g.to(acc)).sum(1)
                d_scale = torch.cat([d_groups, d_scale])
            d_scale = d_scale.to(scale.dtype)
        gs = g * s_h
        g_t = gs[:, gs.shape[1] - r:]
        if needs_A:
            d_A = g_t.t() @ x2
        if needs_B:
            d_B = dy2.t() @ (h[:, h.shape[1] - r:] * s[k:])
        if needs_x:
            if mode == "lowrank" and k:
                d_x = (dy2 @ weight).addmm_(gs, A)
            else:
                d_x = (dy2 @ weight).addmm_(g_t, A[A.shape[0] - r:])
            d_x = d_x.view(ctx.x_shape)
        return d_x, None, None, None, None, d_A, d_B, d_scale, None


class _AddWithGroupScaleGrad(torch.autograd.Function):
    """``y_frozen + y_active`` for 1x1 convolutions whose groups are merged in the frozen weight, with the
    groups' per-rank scales' gradient in the backward (autograd cannot see the scales inside the merged weight).

    ``mode="merged"``: ``saved`` is ``h = A_groups x`` and ``d scale_j = sum_pixels (B_groups^T dy)_j * h_j``.
    ``mode="merged_dense"``: ``saved`` is the input ``x`` and the gradient is contracted from the dense weight
    gradient (`torch.nn.grad.conv2d_weight`): ``d scale_j = B_j^T (dy x^T) A_j``.
    """

    @staticmethod
    def forward(ctx: Any, y_frozen: Tensor, y_active: Tensor, saved: Tensor, A: Tensor, B: Tensor,
                scale: Tensor, mode: str, conv: dict[str, Any]) -> Tensor:
        ctx.save_for_backward(saved, A, B)
        ctx.scale_dtype, ctx.mode, ctx.conv = scale.dtype, mode, conv
        return y_frozen + y_active

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        saved, A, B = ctx.saved_tensors
        acc = torch.promote_types(dy.dtype, torch.float32)  # bf16 products, summed in float32 (float64 stays)
        if ctx.mode == "merged":
            g = F.conv2d(dy, B.t().to(dy.dtype)[:, :, None, None])
            d_scale = (g * saved.to(dy.dtype)).sum(dim=(0, 2, 3), dtype=acc)
        else:
            shape = (B.shape[0], A.shape[1], 1, 1)
            dW = torch.nn.grad.conv2d_weight(saved.to(dy.dtype), shape, dy, **ctx.conv).flatten(1).to(acc)
            d_scale = ((B.t().to(acc) @ dW) * A.to(acc)).sum(1)
        return dy, dy, None, None, None, d_scale.to(ctx.scale_dtype), None, None


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
        # (key, W_g): the groups fused into the frozen weight, see `fused_weight`. Not state: never saved.
        self._fused: tuple[tuple, Tensor] | None = None
        #: Per-input group slot (``N`` longs, -1: none) set for one forward by the controller's router
        #: (`HAMConfig.routing`); None: every group applies to every input (the paper's merged inference).
        self.route: Tensor | None = None
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
        if k == 0 or self.route is not None:  # routed: the groups are added per input (`_routed_groups`)
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
        if self.route is not None and self._active_group_rank:
            y = self._routed_groups(x, y)
        return y

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

    def _routed_groups(self, x: Tensor, y: Tensor) -> Tensor:
        """``y`` plus, for every input, the delta of its routed slot only: ``s c_g B_g A_g x_n`` (`route`)."""
        route = self.route
        assert route is not None
        if route.shape[0] != x.shape[0]:
            raise RuntimeError(f"{route.shape[0]} routes for a batch of {x.shape[0]}: the router's hook must see the "
                               "same batch as the adapted layers (HAMConfig.routing).")
        scales = self.group_scalars.detach() * self.scaling
        for g in torch.unique(route).tolist():
            if g < 0 or not bool(self.group_occupied[g]):
                continue
            idx = torch.nonzero(route == g).flatten()
            B, A = self.slot_factors(g)
            xg = x.index_select(0, idx)
            B, A = (scales[g] * B).to(xg.dtype), A.to(xg.dtype)
            if self.is_conv:
                conv = {"stride": self.base.stride, "padding": self.base.padding, "dilation": self.base.dilation}
                delta = F.conv2d(F.conv2d(xg, A[:, :, None, None], None, **conv), B[:, :, None, None])
            else:
                delta = F.linear(F.linear(xg, A), B)
            y = y.index_add(0, idx, delta.to(y.dtype))
        return y

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
            weight = base.weight
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
            y_frozen = base(x)
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

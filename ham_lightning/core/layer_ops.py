"""What `HAMLayer`'s forward is made of: the fused autograd functions of the frozen-plus-adapters product, the
cost model that picks a layer's group path, and which modules HAM can wrap."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["group_path_costs", "is_adaptable"]


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook (a module-level function, so that a whole model still pickles)."""
    module.refresh()  # type: ignore[operator]


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

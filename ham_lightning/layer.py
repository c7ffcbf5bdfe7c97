"""`HAMLayer`: a frozen Linear or 1x1 Conv2d with pre-allocated group slots and the active task adapter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ham_lightning import algebra


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
    ``out x R x G``), so the first ``r * G`` rank-one terms of all slots are one contiguous slice and the groups and
    the active adapter run as ONE low-rank product of rank ``r_used * G + r``. Unused rank rows are zero. The set of
    parameters never changes across tasks: one optimizer, fixed checkpoints, DDP-safe (empty slots still take part
    in the graph through their scalar).

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
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh())

    def refresh(self) -> None:
        """Re-read the slot ranks after the buffers changed (a merge, ``load_state_dict``)."""
        self._active_group_rank = int(self.group_rank_used.max().item()) if self.max_groups else 0

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
        """``W0 + s * (sum_g c_g B_g A_g + a_t B_t A_t)`` in the base weight's shape and dtype."""
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

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        A, B, scale = self._low_rank_weights()
        if self.is_conv:
            base = self.base
            h = F.conv2d(x, A.to(x.dtype)[:, :, None, None], None, base.stride, base.padding, base.dilation)
            h = h * scale.to(h.dtype)[None, :, None, None]
            return y + F.conv2d(h, B.to(h.dtype)[:, :, None, None])
        h = F.linear(x, A.to(x.dtype)) * scale.to(x.dtype)
        return y + F.linear(h, B.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, max_groups={self.max_groups}, group_rank={self.group_rank}, "
                f"scaling={self.scaling:g}")

"""The baselines' task-boundary rules, run by `HAMController.end_task` when ``HAMConfig.method != "ham"``.

Every baseline reuses HAM's layers: the frozen backbone, the active LoRA adapter (trained on each task) and the
group slots (the merging baselines keep their merged adapter ``E`` in slot 0, so it is fused into the frozen
weight while the next task trains, exactly as a HAM group). What differs is only what happens at a boundary:

* ``seq_lora``: nothing; the one adapter keeps training on the next task (the naive lower bound).
* ``merge_sum``: ``E <- E + D_t``, no pruning; a fresh adapter for the next task trains on top of ``E``.
* ``merge_average``: ``E <- (k E + D_t) / (k + 1)`` with ``k`` tasks merged before: ``E`` is the mean of the
  task deltas (task arithmetic with weight ``1 / T``).
* ``merge_ties``: ``E <- TIES(D_1, ..., D_t)`` on dense per-layer deltas with PEFT's ``ties`` (trim to
  ``density``, elect sign by total mass, disjoint mean), re-factorised by truncated SVD to ``group_rank``.
* ``ncm``: nothing; the backbone stays frozen and `HAMModule` classifies by cosine to class means.

The slot rank is capped at ``group_rank``: beyond it the sum or average is truncated by SVD (Eckart-Young), as
HAM's slots are. The group scalar ``c_0`` is absorbed into the slot before each merge, so the rules act on the
effective deltas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ham_lightning.core import algebra

if TYPE_CHECKING:
    from ham_lightning.core.controller import HAMController, MergeDecision

#: Methods whose merged adapter lives in slot 0.
MERGING = ("merge_sum", "merge_average", "merge_ties")


def merge_sum(E: algebra.Factors, D: algebra.Factors, group_rank: int) -> algebra.Factors:
    """Factors of ``E + D`` (rank capped at ``group_rank`` by truncated SVD)."""
    return _cap(*algebra.concat(*E, *D), group_rank)


def merge_average(E: algebra.Factors, D: algebra.Factors, k: int, group_rank: int) -> algebra.Factors:
    """Factors of ``(k E + D) / (k + 1)``: the running mean of ``k + 1`` task deltas."""
    w = 1.0 / (k + 1)
    return _cap(*algebra.concat(E[0] * (k * w), E[1], D[0] * w, D[1]), group_rank)


def ties_dense(deltas: list[Tensor], density: float, majority_sign_method: str = "total") -> Tensor:
    """TIES merge of dense deltas with unit weights: PEFT's ``peft.utils.merge_utils.ties``."""
    from peft.utils.merge_utils import ties

    weights = torch.ones(len(deltas), dtype=deltas[0].dtype, device=deltas[0].device)
    return ties(list(deltas), weights, density, majority_sign_method=majority_sign_method)  # type: ignore[arg-type]


def refactor(delta: Tensor, rank: int) -> algebra.Factors:
    """Best rank-``rank`` factors ``(B, A)`` of a dense ``out x in`` delta (truncated SVD, balanced)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    return algebra.drop_zero_rank(U[:, :k] * root, root[:, None] * Vh[:k])


def _cap(B: Tensor, A: Tensor, group_rank: int) -> algebra.Factors:
    if B.shape[1] > group_rank:
        B, A = algebra.truncate(B, A, group_rank)
    return algebra.drop_zero_rank(B, A)


@torch.no_grad()
def end_task(controller: HAMController) -> MergeDecision:
    """The boundary of a baseline method (``controller.config.method``); returns the decision it records."""
    from ham_lightning.core.controller import MergeDecision

    cfg = controller.config
    method = cfg.method
    layers = controller.layers
    task = len(controller.history)
    sims: list[float | None] = [None] * cfg.max_groups
    importance = sum(float(layer.importance) for layer in layers.values()) / len(layers)
    kept = 1.0
    if method in MERGING:
        sims = controller.similarities()
        occupied = controller.occupied[0]
        scalars = {id(layer.group_scalars): layer.group_scalars for layer in layers.values()}
        if occupied:  # absorb c_0 into the slot: the rules act on the effective delta E = c_0 B_0 A_0
            for layer in layers.values():
                B, A = layer.group_delta(0)
                layer.set_slot(0, B.clone(), A.clone())
        for c in scalars.values():
            c[0] = 1.0
        kept_num, kept_den = 0.0, 0.0
        for name, layer in layers.items():
            B_t, A_t = layer.task_delta()
            dtype = torch.promote_types(B_t.dtype, torch.float32)
            D = (B_t.to(dtype), A_t.to(dtype))
            E = tuple(f.to(dtype) for f in layer.slot_factors(0)) if occupied else (D[0][:, :0], D[1][:0])
            if method == "merge_sum":
                B_new, A_new = merge_sum(E, D, layer.group_rank)  # type: ignore[arg-type]
            elif method == "merge_average":
                B_new, A_new = merge_average(E, D, task, layer.group_rank)  # type: ignore[arg-type]
            else:
                stored = controller.task_deltas.setdefault(name, [])
                stored.append((D[0].clone(), D[1].clone()))
                dense = [algebra.dense(b, a) for b, a in stored]
                merged = ties_dense(dense, cfg.density)
                B_new, A_new = refactor(merged, layer.group_rank)
                kept_num += float(algebra.norm_sq(B_new, A_new))
                kept_den += float(merged.pow(2).sum())
            layer.set_slot(0, B_new, A_new)
        if method == "merge_ties" and kept_den > 0:
            kept = kept_num / kept_den  # energy of the TIES merge kept by the rank-R re-factorisation
        controller.reset_adapter(task + 1)
    # seq_lora and ncm: the adapter is neither merged nor reset.
    decision = MergeDecision(
        task=task, group=0, opened=method in MERGING and task == 0, similarities=sims, importance=importance,
        kept_fraction=kept,
        group_ranks=[int(max(int(layer.group_rank_used[i]) for layer in layers.values()))
                     for i in range(cfg.max_groups)],
    )
    controller.history.append(decision)
    return decision

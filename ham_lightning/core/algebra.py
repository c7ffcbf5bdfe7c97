"""The merge algebra of HAM as plain functions over low-rank factors.

A low-rank delta is a pair ``(B, A)`` with ``B`` of shape ``out x k`` and ``A`` of shape ``k x in``; it stands for
``B @ A`` and is never materialised unless asked (`dense`). Nothing here knows about modules or tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]


def dense(B: Tensor, A: Tensor) -> Tensor:
    """The ``out x in`` matrix ``B @ A``."""
    return B @ A


def inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """Frobenius inner product ``<B1 A1, B2 A2>`` in ``O((out + in) k1 k2)``.

    ``tr(A1^T B1^T B2 A2) = sum((B1^T B2) * (A1 A2^T))``.
    """
    return ((B1.T @ B2) * (A1 @ A2.T)).sum()


def norm_sq(B: Tensor, A: Tensor) -> Tensor:
    """Squared Frobenius norm of ``B @ A``."""
    return inner(B, A, B, A)


def cosine(deltas1: Sequence[Factors], deltas2: Sequence[Factors], eps: float = 1e-12) -> Tensor:
    """Cosine between two multi-layer deltas, each a sequence of per-layer factors, taken as one long vector.

    Zero when either delta is zero (an untrained adapter, an empty slot), so it never yields NaN.
    """
    dot = torch.stack([inner(b1, a1, b2, a2) for (b1, a1), (b2, a2) in zip(deltas1, deltas2, strict=True)]).sum()
    n1 = torch.stack([norm_sq(b, a) for b, a in deltas1]).sum().clamp_min(0)
    n2 = torch.stack([norm_sq(b, a) for b, a in deltas2]).sum().clamp_min(0)
    denom = torch.sqrt(n1 * n2)
    return torch.where(denom > eps, dot / denom.clamp_min(eps), torch.zeros_like(dot))


def mean_layer_cosine(deltas1: Sequence[Factors], deltas2: Sequence[Factors]) -> Tensor:
    """Mean over layers of the per-layer cosine (the ``layer_mean`` similarity)."""
    values = [cosine([d1], [d2]) for d1, d2 in zip(deltas1, deltas2, strict=True)]
    return torch.stack(values).mean()


def concat(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Factors:
    """Factors of ``B1 A1 + B2 A2``: ``[B1, B2]`` and ``[A1; A2]`` (exact, rank adds up)."""
    return torch.cat([B1, B2], dim=1), torch.cat([A1, A2], dim=0)


def svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``U diag(S) Vh`` of ``B @ A`` from QR of the factors, in ``O((out + in) k^2)``.

    ``B = Qb Rb``, ``A^T = Qa Ra``, so ``B A = Qb (Rb Ra^T) Qa^T`` and only the ``k x k`` core is decomposed.
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    return Qb @ U, S, Vh @ Qa.T


def truncate(B: Tensor, A: Tensor, rank: int) -> Factors:
    """Best rank-``rank`` approximation of ``B @ A`` (Eckart-Young), as balanced factors.

    Exact when the rank of ``B @ A`` is at most ``rank``. The returned factors have exactly ``rank`` columns/rows
    (zero-padded when the product has fewer singular values).
    """
    U, S, Vh = svd(B, A)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B_new = B.new_zeros(B.shape[0], rank)
    A_new = A.new_zeros(rank, A.shape[1])
    B_new[:, :k] = U[:, :k] * root
    A_new[:k] = root[:, None] * Vh[:k]
    return B_new, A_new


def _keep_top(x: Tensor, density: float) -> Tensor:
    k = max(1, math.ceil(density * x.numel()))
    if k >= x.numel():
        return x.clone()
    threshold_idx = torch.topk(x.abs().flatten(), k, sorted=False).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[threshold_idx] = True
    return x * mask.view_as(x)


def prune_magnitude(B: Tensor, A: Tensor, density: float, rescale: bool = False) -> Factors:
    """Keep the top ``density`` fraction of the entries of ``B`` and of ``A`` by absolute value.

    With ``rescale`` the kept delta is multiplied by ``1 / density`` (DARE-style; applied once, to ``B``).
    """
    B_new, A_new = _keep_top(B, density), _keep_top(A, density)
    if rescale:
        B_new = B_new / density
    return B_new, A_new


def prune_rank(B: Tensor, A: Tensor, energy: float) -> Factors:
    """Truncated SVD of ``B @ A`` keeping the fewest singular values whose squared sum reaches ``energy``."""
    U, S, Vh = svd(B, A)
    total = (S**2).sum()
    if total <= 0:
        return B[:, :0], A[:0]
    cumulative = torch.cumsum(S**2, 0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-7).item()) + 1
    k = min(k, S.numel())
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def prune(B: Tensor, A: Tensor, mode: str, density: float, rescale: bool = False) -> Factors:
    """Dispatch to the prune ``mode``: ``magnitude``, ``rank`` or ``none``."""
    if mode == "none":
        return B.clone(), A.clone()
    if mode == "magnitude":
        return prune_magnitude(B, A, density, rescale)
    if mode == "rank":
        return prune_rank(B, A, density)
    raise ValueError(f"Unknown prune mode {mode!r}: use 'magnitude', 'rank' or 'none'.")


def drop_zero_rank(B: Tensor, A: Tensor) -> Factors:
    """Remove rank-one terms whose column of ``B`` or row of ``A`` is all zero (they add nothing)."""
    keep = (B != 0).any(dim=0) & (A != 0).any(dim=1)
    return B[:, keep], A[keep]

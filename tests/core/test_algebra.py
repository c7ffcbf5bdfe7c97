import pytest
import torch

from ham_lightning.core import algebra


def _factors(out: int, k: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, k, generator=g, dtype=torch.float64), torch.randn(k, inp, generator=g, dtype=torch.float64)


def test_inner_and_cosine_equal_dense():
    (B1, A1), (B2, A2) = _factors(20, 3, 30, 0), _factors(20, 5, 30, 1)
    D1, D2 = B1 @ A1, B2 @ A2
    assert torch.allclose(algebra.inner(B1, A1, B2, A2), (D1 * D2).sum())
    dense_cos = (D1 * D2).sum() / (D1.norm() * D2.norm())
    assert torch.allclose(algebra.cosine([(B1, A1)], [(B2, A2)]), dense_cos)


def test_cosine_over_layers_is_concatenated_vectors():
    layers1 = [_factors(8, 2, 6, s) for s in range(3)]
    layers2 = [_factors(8, 4, 6, 10 + s) for s in range(3)]
    v1 = torch.cat([(B @ A).flatten() for B, A in layers1])
    v2 = torch.cat([(B @ A).flatten() for B, A in layers2])
    expected = torch.nn.functional.cosine_similarity(v1, v2, dim=0)
    assert torch.allclose(algebra.cosine(layers1, layers2), expected)
    per_layer = torch.stack([torch.nn.functional.cosine_similarity((B1 @ A1).flatten(), (B2 @ A2).flatten(), dim=0)
                             for (B1, A1), (B2, A2) in zip(layers1, layers2)]).mean()
    assert torch.allclose(algebra.mean_layer_cosine(layers1, layers2), per_layer)


def test_cosine_of_zero_delta_is_zero_not_nan():
    B, A = _factors(4, 2, 5, 0)
    assert algebra.cosine([(torch.zeros_like(B), A)], [(B, A)]).item() == 0.0


def test_truncate_is_exact_when_rank_fits():
    B, A = algebra.concat(*_factors(30, 3, 40, 0), *_factors(30, 4, 40, 1))  # rank 7 in 7 columns
    B2 = torch.cat([B, B[:, :2]], dim=1)  # rank still 7, 9 columns
    A2 = torch.cat([A, A[:2]], dim=0)
    Bt, At = algebra.truncate(B2, A2, 7)
    assert Bt.shape == (30, 7) and At.shape == (7, 40)
    assert torch.allclose(Bt @ At, B2 @ A2, atol=1e-10)


def test_truncate_is_best_rank_r_approximation():
    B, A = _factors(25, 10, 35, 3)
    Bt, At = algebra.truncate(B, A, 4)
    U, S, Vh = torch.linalg.svd(B @ A)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    assert torch.allclose(Bt @ At, best, atol=1e-9)
    assert torch.allclose((B @ A - Bt @ At).norm() ** 2, (S[4:] ** 2).sum())


def test_prune_magnitude_keeps_top_entries():
    B, A = _factors(10, 4, 10, 0)
    Bp, Ap = algebra.prune_magnitude(B, A, 0.25)
    assert (Bp != 0).sum() == 10 and (Ap != 0).sum() == 10
    assert Bp.abs().max() == B.abs().max()
    kept_min = Bp[Bp != 0].abs().min()
    assert (B.abs()[Bp == 0] <= kept_min).all()
    Br, _ = algebra.prune_magnitude(B, A, 0.25, rescale=True)
    assert torch.allclose(Br, Bp * 4)


def test_prune_rank_keeps_energy():
    B, A = _factors(30, 8, 30, 0)
    S = torch.linalg.svdvals(B @ A)
    Bp, Ap = algebra.prune_rank(B, A, 0.9)
    k = Bp.shape[1]
    energy = (S[:k] ** 2).sum() / (S**2).sum()
    assert energy >= 0.9 and (S[: k - 1] ** 2).sum() / (S**2).sum() < 0.9
    assert torch.linalg.matrix_rank(Bp @ Ap) == k


def test_prune_none_is_identity_and_unknown_mode_errors():
    B, A = _factors(5, 2, 5, 0)
    Bp, Ap = algebra.prune(B, A, "none", 0.5)
    assert torch.equal(Bp, B) and torch.equal(Ap, A)
    with pytest.raises(ValueError, match="Unknown prune mode"):
        algebra.prune(B, A, "random", 0.5)

"""`ClassGaussians`: exact statistics whatever the task split, and draws that follow them."""

from __future__ import annotations

import pytest
import torch

from ham_lightning.core.class_gaussians import ClassGaussians


def _data(n: int = 4000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, -3.0, 2.0]])
    factor = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [0.0, 0.3, 0.4]])
    y = torch.arange(3).repeat_interleave(n)
    return means[y] + torch.randn(len(y), 3, generator=g) @ factor.T, y, means, factor @ factor.T


@pytest.mark.parametrize("covariance", ["shared", "diagonal"])
def test_draws_follow_each_class_gaussian(covariance: str) -> None:
    x, y, means, cov = _data()
    stats = ClassGaussians(3, 5, covariance=covariance, shrinkage=0.0)
    stats.start_task([0, 1, 2])
    stats.update(x, y)
    assert stats.known.tolist() == [True, True, True, False, False]
    labels = torch.tensor([2] * 20000 + [0] * 10)
    drawn = stats.draw(labels, torch.Generator().manual_seed(1))
    assert drawn.dtype == torch.float32 and drawn.shape == (20010, 3)
    torch.testing.assert_close(stats.means()[:3].float(), means, atol=0.1, rtol=0)  # the data's own means
    torch.testing.assert_close(drawn[:20000].mean(0), stats.means()[2].float(), atol=0.03, rtol=0)
    expected = cov if covariance == "shared" else torch.diag(cov.diagonal())
    torch.testing.assert_close(torch.cov(drawn[:20000].T), expected, atol=0.06, rtol=0)
    again = stats.draw(labels, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again)  # the same generator gives the same draws
    assert torch.equal(stats(x[:4]), x[:4])  # its forward hands the features on


def test_statistics_do_not_depend_on_the_task_split() -> None:
    x, y, _, _ = _data(200)
    by_task, at_once = ClassGaussians(3, 3), ClassGaussians(3, 3)
    for c in range(3):
        by_task.update(x[y == c], y[y == c])
    at_once.update(x, y)
    torch.testing.assert_close(by_task.pooled_covariance(), at_once.pooled_covariance())
    torch.testing.assert_close(by_task.means(), at_once.means())


def test_bad_covariance_is_refused() -> None:
    with pytest.raises(ValueError, match="covariance must be 'shared' or 'diagonal'"):
        ClassGaussians(3, 3, covariance="full")


def test_clip_keeps_draws_in_the_range_the_features_took() -> None:
    x, y, _, _ = _data(500)
    x = x.clamp_min(0.0)  # as after a ReLU
    clipped, free = ClassGaussians(3, 3, clip=True), ClassGaussians(3, 3)
    for stats in (clipped, free):
        stats.update(x, y)
    labels = torch.zeros(2000, dtype=torch.long)
    assert (free.draw(labels, torch.Generator().manual_seed(0)) < 0).any()
    drawn = clipped.draw(labels, torch.Generator().manual_seed(0))
    assert (drawn >= x.min(0).values).all() and (drawn <= x.max(0).values).all()
    state = {k: v for k, v in clipped.state_dict().items() if k not in ("low", "high")}  # an older checkpoint
    old = ClassGaussians(3, 3, clip=True)
    old.load_state_dict(state)
    assert torch.isinf(old.low).all() and (old.draw(labels, torch.Generator().manual_seed(0)) < 0).any()

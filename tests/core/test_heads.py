"""IncrementalHead: masking of logits and rows of finished tasks that nothing can move."""

from __future__ import annotations

import pytest
import torch

from ham_lightning.core.heads import IncrementalHead


def test_masks_current_and_seen() -> None:
    head = IncrementalHead(4, 6)
    head.start_task([0, 1])
    head.end_task()
    head.start_task([2, 3])
    logits = torch.zeros(1, 6)
    assert torch.isfinite(head.train_logits(logits)).tolist() == [[False, False, True, True, False, False]]
    assert torch.isfinite(head.eval_logits(logits)).tolist() == [[True, True, True, True, False, False]]
    seen_head = IncrementalHead(4, 6, mask="seen")
    seen_head.start_task([0, 1])
    seen_head.start_task([2, 3])
    assert torch.isfinite(seen_head.train_logits(logits)).sum() == 4


def test_finished_rows_survive_weight_decay_and_momentum() -> None:
    torch.manual_seed(0)
    head = IncrementalHead(4, 4)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.5)
    head.start_task([0, 1])
    for _ in range(3):
        opt.zero_grad()
        head.train_logits(head(torch.randn(8, 4)))[:, :2].logsumexp(1).mean().backward()
        opt.step()
    head.end_task()
    x = torch.randn(5, 4)
    before = head(x)[:, :2].clone()
    head.start_task([2, 3])
    for _ in range(5):  # momentum from task 0 and weight decay act on every row of `linear`
        opt.zero_grad()
        head.train_logits(head(torch.randn(8, 4)))[:, 2:].logsumexp(1).mean().backward()
        opt.step()
    assert torch.equal(head(x)[:, :2], before)
    assert not torch.equal(head.linear.weight[:2], head.frozen_weight[:2])  # the trainable copy did move


def test_unfrozen_rows_keep_training() -> None:
    head = IncrementalHead(4, 4, freeze_old_rows=False)
    head.start_task([0, 1])
    head.end_task()
    assert not head.frozen.any()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask must be 'current' or 'seen'"):
        IncrementalHead(4, 4, mask="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range for a head of 4 classes"):
        IncrementalHead(4, 4).start_task([3, 4])


def test_cosine_head_scale_and_frozen_rows() -> None:
    torch.manual_seed(0)
    head = IncrementalHead(4, 4, kind="cosine", scale=10.0)
    assert head.linear.bias is None
    head.start_task([0, 1])
    head.end_task()
    x = torch.randn(6, 4) * 100  # the logits do not grow with the features' norm
    logits = head(x)
    assert logits.abs().max() <= 10.0 + 1e-5
    expected = 10.0 * torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(head.linear.weight, dim=1).T
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="kind must be 'linear' or 'cosine'"):
        IncrementalHead(4, 4, kind="mlp")  # type: ignore[arg-type]

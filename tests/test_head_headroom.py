"""benchmarks/head_headroom.py: the logistic head it fits on a run's final features."""

from __future__ import annotations

import torch
from helpers import load_benchmark


def test_the_logistic_head_separates_separable_classes_in_the_raw_feature_space() -> None:
    script = load_benchmark("head_headroom")
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0.0, 100.0], [-4.0, 0.0, 100.0], [0.0, 4.0, 100.0]])  # one feature far from 0
    y = torch.tensor([3, 7, 9]).repeat_interleave(40)  # global class ids, not 0..2
    x = centers.repeat_interleave(40, 0) + 0.5 * torch.randn(120, 3, generator=generator)
    W, b = script.logistic_head(x, y, torch.tensor([3, 7, 9]), weight_decay=1e-4, steps=100)
    assert W.shape == (3, 3) and b.shape == (3,)
    # the standardization is folded into W and b: raw features in, the class's column out
    assert torch.equal(torch.tensor([3, 7, 9])[(x @ W + b).argmax(1)], y)
    flipped = torch.tensor([7, 3, 9]).repeat_interleave(40)  # the same points, the first two labels swapped
    W2, b2 = script.logistic_head(x, flipped, torch.tensor([3, 7, 9]), weight_decay=1e-4, steps=100)
    assert torch.equal(torch.tensor([3, 7, 9])[(x @ W2 + b2).argmax(1)], flipped)

"""`GroupedHead`: one statistics head per group slot, fed and asked by slot."""

from __future__ import annotations

import pytest
import torch

from ham_lightning.core.grouped_head import GroupedHead
from ham_lightning.core.heads import IncrementalHead, NCMHead
from ham_lightning.core.routing import Routes


def test_each_group_head_learns_its_own_classes_and_scores_its_own_inputs() -> None:
    head = GroupedHead(2, 4, num_groups=2, factory=lambda: NCMHead(2, 4, scale=1.0))
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    for classes, group in [([0, 1], 0), ([2, 3], 1)]:
        head.start_task(classes)
        head.on_group(group)
        y = torch.tensor(classes).repeat(5)
        head.update(means[y], y)
        head.fit()
    assert head.class_slot.tolist() == [0, 0, 1, 1]
    assert head.heads[0].class_count.tolist() == [5, 5, 0, 0] and head.heads[1].class_count.tolist() == [0, 0, 5, 5]
    x = means[[0, 2]]
    scores = head(x, torch.tensor([0, 1]))
    assert torch.isinf(scores[0, 2:]).all() and torch.isinf(scores[1, :2]).all()
    assert scores.argmax(1).tolist() == [0, 2]
    assert torch.isinf(head(x, torch.tensor([-1, 1]))[0]).all()  # no route: no score
    assert torch.equal(head(x, Routes.of(torch.tensor([0, 1]))), scores)  # the layers' routes, grouped once
    assert head.summary() == {}  # NCM records nothing


def test_grouped_head_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="needs statistics heads"):
        GroupedHead(2, 4, num_groups=2, factory=lambda: IncrementalHead(2, 4))
    head = GroupedHead(2, 4, num_groups=2, factory=lambda: NCMHead(2, 4))
    head.start_task([0, 1])
    with pytest.raises(RuntimeError, match="belong to no group"):
        head.update(torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        head.on_group(2)
    with pytest.raises(ValueError, match="pass the routed slot"):
        head(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="2 routed slots for 1 inputs"):
        head(torch.zeros(1, 2), torch.tensor([0, 1]))

"""The `Head` contract: what the task sequence asks of a head over every class of the scenario, and the head
registry's functions (`register_head`, `create_head`, `list_heads`; built-in heads in `ham_lightning.core.heads`).

The sequence driver (`ham_lightning.ContinualEvaluation`, so `HierarchicalMergeCallback` too) finds every `Head`
in the module it fits and drives it, on `HAMModule` and on a user's own module alike:

* ``start_task(classes)`` before the task's first step (the classes become current and seen);
* ``end_task()`` once the task has trained, before the merge (a trained head freezes the task's rows);
* when ``needs_statistics``: one pass over the task's training data after the merge, in eval mode, in which the
  head's ``update(features, labels)`` gets the features its ``forward`` is called on, then ``fit()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ham_lightning.core.registry import HEADS

__all__ = ["Head", "HeadFactory", "StatisticsHead", "create_head", "is_statistics_head", "list_heads", "mark_task", "register_head"]


def mark_task(current: Tensor, seen: Tensor, classes: Sequence[int]) -> None:
    """Flag ``classes`` as the current task's (only them) and as seen; refuses classes outside the head."""
    index = torch.as_tensor(list(classes), dtype=torch.long, device=current.device)
    if index.numel() and (index.min() < 0 or index.max() >= current.numel()):
        raise ValueError(f"task classes {list(classes)} out of range for a head of {current.numel()} classes")
    current.zero_()
    current[index] = True
    seen[index] = True


class Head(nn.Module):
    """A head over every class of the scenario that follows the task sequence (see the module docstring).

    ``forward(features)`` gives unmasked logits over all ``num_classes``; ``train_logits`` / ``eval_logits``
    mask them for the loss (the current task's classes) and for evaluation (every class seen). A subclass fitted
    from class statistics sets ``needs_statistics = True`` and implements ``update`` and ``fit``.
    """

    #: Whether the head is fitted from a statistics pass (``update`` then ``fit``) rather than by gradient.
    needs_statistics: ClassVar[bool] = False
    seen: Tensor
    current: Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("current", torch.zeros(num_classes, dtype=torch.bool))

    def start_task(self, classes: Sequence[int]) -> None:
        """Classes of the task about to train: they become current and seen."""
        mark_task(self.current, self.seen, classes)

    def end_task(self) -> None:
        """The task has trained (before the merge). Nothing by default."""

    def on_group(self, group: int) -> None:
        """The task just merged into group slot ``group`` (HAM's driver, before the statistics pass). Nothing by
        default; `GroupedHead` records the slot of the task's classes."""

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Accumulate one batch of the statistics pass (heads with ``needs_statistics``)."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_statistics but does not implement update()")

    def fit(self) -> None:
        """Solve the head from everything accumulated (heads with ``needs_statistics``)."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_statistics but does not implement fit()")

    def summary(self) -> dict[str, float]:
        """Scalars worth recording after each boundary's fit (results.json's task records); none by default."""
        return {}

    def train_logits(self, logits: Tensor) -> Tensor:
        """Logits masked for training: the current task's classes."""
        return logits.masked_fill(~self.current, float("-inf"))

    def eval_logits(self, logits: Tensor) -> Tensor:
        """Logits masked to every class seen so far (task-agnostic evaluation)."""
        return logits.masked_fill(~self.seen, float("-inf"))


class StatisticsHead(Head):
    """A head fitted in closed form from class statistics of the features, accumulated task by task.

    It never forgets by construction: a finished task's statistics are sums that later tasks only add to.
    ``update(features, labels)`` accumulates one batch; ``fit()`` solves the head from everything accumulated.
    The features of a finished task were taken under the backbone of that time (see docs/method.md on drift).
    """

    #: It needs a statistics pass over each task's training data (features in eval mode) after the merge.
    needs_statistics = True

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(num_classes)
        self.in_features, self.num_classes = in_features, num_classes


def is_statistics_head(head: nn.Module) -> bool:
    """Whether ``head`` is fitted from a statistics pass rather than trained by gradient."""
    return bool(getattr(head, "needs_statistics", False))


#: ``factory(in_features, num_classes, **kwargs) -> Head``; it takes the common options (``mask``,
#: ``freeze_old_rows``, ``scale``) and ignores those it has no use for.
HeadFactory = Callable[..., nn.Module]


def register_head(name: str, factory: HeadFactory) -> HeadFactory:
    """Make ``create_head(name, ...)`` (``HAMModule(head=name)``, ``--model.head name``) build
    ``factory(in_features, num_classes, **kwargs)``; a name already registered is refused."""
    return HEADS.register(name, factory)


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return HEADS.names()


def create_head(name: str, in_features: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """A head by registry name: ``linear``, ``cosine`` (trained), ``ncm``, ``ridge``, ``aligned`` (class
    statistics), or one a user's package registered."""
    return HEADS.create(name, in_features, num_classes, **kwargs)

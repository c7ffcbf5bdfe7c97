"""The small protocol a data module implements to drive a class-incremental task sequence.

`ContinualEvaluation` and `HierarchicalMergeCallback` need nothing more than this from a datamodule, so a
user's own LightningDataModule works once it has these members; `ClassIncrementalDataModule` is the full one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TaskProtocol(Protocol):
    """What the HAM plug-in asks of a data module.

    Labels are global class indices after the class order is applied; task ``t`` owns the classes
    ``task_classes(t)``. ``test_dataloader()`` returns one loader per task seen so far (tasks ``0..current_task``),
    in task order, so Lightning's ``dataloader_idx`` is the task index.
    """

    num_tasks: int
    num_classes: int
    current_task: int

    def set_task(self, task: int) -> None:
        """Make ``task`` current: the train loader serves it; test loaders cover tasks ``0..task``."""

    def task_classes(self, task: int) -> Sequence[int]:
        """Global class indices owned by ``task``."""

    def train_dataloader(self) -> Any:
        """Loader over the current task's training samples, yielding ``(images, labels)``."""

    def test_dataloader(self) -> Any:
        """One loader per seen task, yielding ``(images, labels)``."""


def check_task_protocol(datamodule: object) -> TaskProtocol:
    """Return ``datamodule`` if it implements `TaskProtocol`, else raise a `TypeError` naming what is missing."""
    required = ("num_tasks", "num_classes", "current_task", "set_task", "task_classes", "train_dataloader",
                "test_dataloader")
    missing = [name for name in required if not hasattr(datamodule, name)]
    if missing:
        raise TypeError(
            f"{type(datamodule).__name__} does not implement ham_lightning.TaskProtocol: missing {missing}. "
            "Use ham_lightning.ClassIncrementalDataModule, or add these members to your datamodule "
            "(see ham_lightning/lightning/task_protocol.py)."
        )
    return datamodule  # type: ignore[return-value]

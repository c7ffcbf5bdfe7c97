"""The two small protocols of a class-incremental task sequence: `TaskProtocol` (what a data module implements to
drive it) and `TaskAware` (what a LightningModule may implement to follow it).

`ContinualEvaluation` and `HierarchicalMergeCallback` need nothing more than `TaskProtocol` from a datamodule, so a
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


@runtime_checkable
class TaskAware(Protocol):
    """What a LightningModule may implement to follow the task sequence; the sequence driver
    (`ContinualEvaluation`, `HierarchicalMergeCallback`) calls these methods of a module that is a `TaskAware`.

    Inherit it (``class MyModule(LightningModule, ham_lightning.TaskAware)``) and override only the hooks you
    need: the others do nothing. At a boundary the driver runs, in order: the heads' ``end_task``,
    `on_before_merge`, the merge, the statistics pass (statistics heads, input subspaces), `on_after_merge`, the
    evaluation of every seen task; then the next task's heads' ``start_task`` and `on_task_start`. Heads
    (`ham_lightning.core.head.Head`) and the HAM controller are driven by the callback itself: a module needs no
    hook for them.
    """

    def on_task_start(self, task: int, classes: Sequence[int]) -> None:
        """Before ``task``'s first training step; ``classes`` are its global class indices."""

    def on_before_merge(self, task: int) -> None:
        """``task`` has trained; the merge has not run yet (the adapters are still the task's own)."""

    def on_after_merge(self, task: int) -> None:
        """After the merge and the statistics pass, before the seen tasks are evaluated on this model."""


#: Method names a module might use for the sequence without declaring `TaskAware` (then nothing would call them).
TASK_HOOK_NAMES = ("on_task_start", "on_before_merge", "on_after_merge", "on_task_end", "on_task_merged")


def task_aware(module: object) -> TaskAware | None:
    """``module`` if it is a `TaskAware`, None if it defines none of its hooks; a module that defines some hook
    names without being a `TaskAware` gets a `TypeError` naming them and the fix (they would never be called)."""
    if isinstance(module, TaskAware):
        return module
    stray = [name for name in TASK_HOOK_NAMES if callable(getattr(module, name, None))]
    if stray:
        raise TypeError(
            f"{type(module).__name__} defines {', '.join(stray)} but is not a ham_lightning.TaskAware, so the "
            f"task sequence would never call it. Add TaskAware to its bases (class {type(module).__name__}"
            "(LightningModule, ham_lightning.TaskAware)); the hooks are on_task_start(task, classes), "
            "on_before_merge(task) and on_after_merge(task)."
        )
    return None


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

"""`TaskProgressBar`: Lightning's progress bar, with the task of the sequence next to the epoch."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from ham_lightning.lightning.sequence import ContinualEvaluation, resolve_epochs_per_task


class TaskProgressBar(TQDMProgressBar):
    """Shows ``Task 3/10 · Epoch 1/5`` (epoch within the task) instead of ``Epoch 21``."""

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        description = task_description(trainer)
        if description and self.train_progress_bar is not None:
            self.train_progress_bar.set_description(description)


def task_description(trainer: Trainer) -> str | None:
    """``Task t/T · Epoch e/E`` from the trainer's `ContinualEvaluation` callback and datamodule, if any."""
    continual = next((c for c in trainer.callbacks if isinstance(c, ContinualEvaluation)), None)  # type: ignore[attr-defined]
    datamodule = trainer.datamodule
    if continual is None or datamodule is None or not hasattr(datamodule, "num_tasks"):
        return None
    task = min(continual.current_task, datamodule.num_tasks - 1)
    text = f"Task {task + 1}/{datamodule.num_tasks}"
    epochs = resolve_epochs_per_task(continual, datamodule)
    if epochs:
        text += f" · Epoch {trainer.current_epoch - continual.task_start_epoch + 1}/{epochs}"
    return text

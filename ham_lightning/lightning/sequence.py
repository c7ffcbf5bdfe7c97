"""`ContinualEvaluation`: drives a class-incremental task sequence in Lightning and fills the accuracy matrix.

Two ways of driving a sequence give the same numbers (design.md section 2):

* one ``trainer.fit`` per task (a user's own loop): the boundary is the end of that fit, or the end of the
  ``epochs_per_task``-th epoch when it is known;
* one ``fit`` over the whole sequence: the boundary is every ``epochs_per_task`` epochs. The optimizer and LR
  schedulers are rebuilt at the start of the next task, exactly as a new ``fit`` would, and the datamodule serves
  the next task's loader (the trainer must reload dataloaders at boundaries).

The driver also drives the module: every `Head` in it (``start_task`` / ``end_task``, the statistics pass of
statistics heads) and, for a `TaskAware` module, its hooks, called directly.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchmetrics.classification import MulticlassConfusionMatrix
from typing_extensions import override

from ham_lightning.lightning.evaluation import Counts, continual_metrics, error_breakdown, evaluate_tasks
from ham_lightning.lightning.statistics import statistics_pass, task_heads
from ham_lightning.lightning.task_protocol import TaskProtocol, check_task_protocol, task_aware


def resolve_epochs_per_task(callback: Any, datamodule: Any) -> int | None:
    """The one ``epochs_per_task`` of a sequence: the callback's or the datamodule's, whichever is set.

    ``callback`` and ``datamodule`` are the objects (anything with ``epochs_per_task``, or ``None``) or, before
    they are built (the CLI sizing ``max_epochs``), their ``epochs_per_task`` values. Both may be set only to the
    same value; otherwise a `MisconfigurationException` names both and says which to keep. ``None`` when neither
    is set (a task then ends with each ``fit``). Used by `ContinualEvaluation`, the progress bar and the CLI.
    """

    def value(source: Any) -> int | None:
        return source if source is None or isinstance(source, int) else getattr(source, "epochs_per_task", None)

    def name(source: Any, default: str) -> str:
        return default if source is None or isinstance(source, int) else type(source).__name__

    own, data = value(callback), value(datamodule)
    if own is not None and data is not None and own != data:
        raise MisconfigurationException(
            f"epochs_per_task is set twice with different values: "
            f"{name(callback, 'HierarchicalMergeCallback')}(epochs_per_task={own}) (CLI: --merge.epochs_per_task "
            f"{own}) and {name(datamodule, 'the datamodule')}(epochs_per_task={data}) (CLI: --data.epochs_per_task "
            f"{data}). The datamodule owns the task schedule: keep its value and remove the callback's (or set "
            "both to the same value)."
        )
    return own if own is not None else data


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of the task: CUDA allocator peak on a GPU, else the process's peak resident set (monotone)."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_allocated"}
    try:
        import resource

        return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
                "peak_memory_kind": "process_max_rss"}
    except ImportError:  # Windows
        return {"peak_memory_mb": None, "peak_memory_kind": None}


class ContinualEvaluation(Callback):
    """Task boundaries, evaluation of every seen task after each one, and the accuracy matrix.

    Args:
        epochs_per_task: epochs of each task; ``None`` reads the datamodule's ``epochs_per_task`` and, if that is
            ``None`` too, ends a task at the end of each ``fit``. Setting both to different values is an error
            (`resolve_epochs_per_task`).
        evaluate: evaluate every seen task at each boundary (the accuracy matrix); off only to save time.
    """

    def __init__(self, epochs_per_task: int | None = None, evaluate: bool = True) -> None:
        if epochs_per_task is not None and epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be >= 1 or None, got {epochs_per_task}")
        self.epochs_per_task = epochs_per_task
        self.evaluate = evaluate
        # Task being trained (or, once all are done, num_tasks).
        self._task = 0
        # First epoch (trainer.current_epoch) of the current task in this fit.
        self._task_start_epoch = 0
        # Whether the current task has trained at least one epoch since its start.
        self._task_has_trained = False
        # Rebuild optimizers/schedulers at the next epoch start (schedule mode, after a boundary).
        self._rebuild_optimizers = False
        self._task_start_time: float | None = None
        # rows[i][j] = (correct, total) on task j after task i; final once written (already summed over ranks).
        self.rows: list[list[Counts]] = []
        self.task_records: list[dict[str, Any]] = []
        # Where the latest evaluation's errors went (`error_breakdown`); results.json's ``errors``.
        self.errors: dict[str, Any] | None = None

    # -- what subclasses extend ---------------------------------------------------------------------------------
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> dict[str, float]:
        """Called at a boundary before evaluation; returns extra metrics to log. Override to merge adapters."""
        return {}

    def results(self) -> dict[str, Any]:
        """Accuracy matrix, summary metrics, per-task records and the last evaluation's `errors` (results.json schema,
        percent)."""
        errors = {"errors": self.errors} if self.errors is not None else {}
        return {**continual_metrics(self.rows), "tasks": list(self.task_records), **errors}

    @property
    def current_task(self) -> int:
        """The task being trained (``num_tasks`` once the sequence is done)."""
        return self._task

    @property
    def task_start_epoch(self) -> int:
        """The trainer epoch at which the current task started in this fit."""
        return self._task_start_epoch

    # -- helpers ------------------------------------------------------------------------------------------------
    def _datamodule(self, trainer: Trainer) -> TaskProtocol:
        if trainer.datamodule is None:
            raise MisconfigurationException(
                f"{type(self).__name__} needs a datamodule implementing ham_lightning.TaskProtocol: pass it as "
                "trainer.fit(model, datamodule=...)."
            )
        return check_task_protocol(trainer.datamodule)

    def _resolved_epochs_per_task(self, trainer: Trainer) -> int | None:
        return resolve_epochs_per_task(self, trainer.datamodule)

    def _start_task(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The current task becomes the datamodule's, the heads' and the module's."""
        dm = self._datamodule(trainer)
        dm.set_task(self._task)
        classes = list(dm.task_classes(self._task))
        for head in task_heads(pl_module):
            head.start_task(classes)
        module = task_aware(pl_module)
        if module is not None:
            module.on_task_start(self._task, classes)

    def _statistics_pass(self, trainer: Trainer, pl_module: LightningModule,
                         collecting: contextlib.AbstractContextManager[Any] | None = None) -> None:
        """After the merge: fit the statistics heads (if any) on the task's training data, inside ``collecting``
        (a subclass's own statistics, such as HAM's input moments)."""
        heads = [h for h in task_heads(pl_module) if h.needs_statistics]
        if heads or collecting is not None:
            statistics_pass(pl_module, self._datamodule(trainer).train_dataloader(), heads, collecting)

    # -- hooks --------------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = self._datamodule(trainer)
        self._resolved_epochs_per_task(trainer)  # a conflicting setting fails before anything trains
        try:
            task_aware(pl_module)  # hooks that would never be called fail before anything trains
        except TypeError as err:
            raise MisconfigurationException(str(err)) from None
        if trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs:
            raise MisconfigurationException(
                f"This Trainer already ran {trainer.current_epoch} of max_epochs={trainer.max_epochs} epochs, so "
                "this fit would silently train nothing. Create a new Trainer for each task's fit, or raise "
                "`trainer.fit_loop.max_epochs` before calling fit again."
            )
        if self._task >= dm.num_tasks:
            raise MisconfigurationException(
                f"All {dm.num_tasks} tasks are already trained; nothing left to fit. Start a new run (new callback)."
            )
        if trainer.ckpt_path is None:
            # A new fit builds fresh optimizers anyway; a resumed one restores the saved (old-task) state and
            # must still rebuild if the checkpoint was taken at a boundary.
            self._rebuild_optimizers = False
        self._start_task(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Loops are restored by now: a new fit restarts epoch counting, a resumed one keeps the saved start.
        if trainer.current_epoch < self._task_start_epoch:
            self._task_start_epoch = trainer.current_epoch
        ept = self._resolved_epochs_per_task(trainer)
        dm = self._datamodule(trainer)
        remaining = dm.num_tasks - self._task
        if ept is not None and trainer.max_epochs is not None and trainer.max_epochs - self._task_start_epoch > ept:
            reload = trainer.reload_dataloaders_every_n_epochs
            if not reload or ept % reload:
                raise MisconfigurationException(
                    f"One fit spans several tasks (max_epochs={trainer.max_epochs}, epochs_per_task={ept}) but the "
                    f"trainer reloads dataloaders every {reload} epochs, so it would keep training the first task's "
                    f"data. Use Trainer(reload_dataloaders_every_n_epochs={ept}) (or 1)."
                )
            expected = self._task_start_epoch + remaining * ept
            if trainer.max_epochs != expected:
                rank_zero_warn(
                    f"max_epochs={trainer.max_epochs} does not equal {remaining} remaining tasks x {ept} epochs "
                    f"(+ {self._task_start_epoch} done) = {expected}; the sequence stops after the last task "
                    "or at max_epochs, whichever comes first."
                )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rebuild_optimizers:
            # Exactly what a new fit does: fresh optimizer state and LR schedule for the new task.
            trainer.strategy.setup_optimizers(trainer)
            self._rebuild_optimizers = False
        if not self._task_has_trained or self._task_start_time is None:
            self._task_has_trained = True
            self._task_start_time = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ept = self._resolved_epochs_per_task(trainer)
        if ept is not None and trainer.current_epoch + 1 - self._task_start_epoch >= ept:
            self._end_task(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._task_has_trained:  # the fit ended before epochs_per_task (or there is none): the task ends here
            self._end_task(trainer, pl_module)

    def _end_task(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = self._datamodule(trainer)
        task = self._task
        profile = trainer.profiler.profile  # each phase of the boundary is a profiler action of its own
        module = task_aware(pl_module)
        with profile("[TaskBoundary]merge"):
            for head in task_heads(pl_module):
                head.end_task()
            if module is not None:
                module.on_before_merge(task)
            extra = self.on_task_end(trainer, pl_module, task)
        # After the merge, before evaluation: what the module computes on the model it will predict with.
        with profile("[TaskBoundary]statistics pass (head fit, input subspace)"):
            self._statistics_pass(trainer, pl_module)
            if module is not None:
                module.on_after_merge(task)
        record: dict[str, Any] = {
            "task": task,
            "wall_time_s": time.perf_counter() - self._task_start_time if self._task_start_time else None,
            **peak_memory(pl_module.device),
        }
        outer = task_heads(pl_module)  # a head inside a head reports through its owner
        heads = {name or "head": summary for name, m in pl_module.named_modules()
                 if any(m is h for h in outer) and (summary := m.summary())}
        if heads:  # e.g. the ridge head's chosen `lam` at every boundary
            record["heads"] = heads
        if self.evaluate:
            class_task = {c: t for t in range(task + 1) for c in dm.task_classes(t)}  # every seen class's task
            seen = list(class_task)
            loaders = dm.test_dataloader()
            loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
            was_training = pl_module.training
            pl_module.eval()
            confusion = MulticlassConfusionMatrix(dm.num_classes, validate_args=False).to(pl_module.device)
            with profile("[TaskBoundary]evaluate seen tasks"):
                row = evaluate_tasks(pl_module, loaders[: task + 1], seen, dm.num_classes, pl_module.device, trainer,
                                     confusion)
            pl_module.train(was_training)
            self.errors = error_breakdown(confusion.compute(), class_task, getattr(dm, "task_domains", None))
            self.rows.append(row)
            summary = continual_metrics(self.rows)
            metrics = {f"cl/acc_task_{j}": 100.0 * c / n if n else 0.0 for j, (c, n) in enumerate(row)}
            metrics["cl/acc_seen"] = summary["incremental_accuracy"][-1]  # type: ignore[index]
            metrics["cl/avg_incremental_acc"] = summary["average_incremental_accuracy"]  # type: ignore[assignment]
            metrics["cl/forgetting"] = summary["forgetting"]  # type: ignore[assignment]
            record["accuracy_seen"] = metrics["cl/acc_seen"]
        else:
            metrics = {}
        metrics.update(extra)
        metrics["cl/task"] = task
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.task_records.append(record)
        self._task += 1
        self._task_has_trained = False
        self._task_start_epoch = trainer.current_epoch + 1
        if self._task < dm.num_tasks:
            self._start_task(trainer, pl_module)
            self._rebuild_optimizers = True
        else:
            trainer.should_stop = True

    # -- state --------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self._task,
            "task_start_epoch": self._task_start_epoch,
            "task_has_trained": self._task_has_trained,
            "rebuild_optimizers": self._rebuild_optimizers,
            "rows": [list(map(list, row)) for row in self.rows],
            "task_records": self.task_records,
            "errors": self.errors,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._task = state_dict["task"]
        self._task_start_epoch = state_dict["task_start_epoch"]
        self._task_has_trained = state_dict["task_has_trained"]
        self._rebuild_optimizers = state_dict["rebuild_optimizers"]
        self.rows = [[(int(c), int(n)) for c, n in row] for row in state_dict["rows"]]
        self.task_records = list(state_dict["task_records"])
        self.errors = state_dict.get("errors")  # absent in checkpoints written before it was kept

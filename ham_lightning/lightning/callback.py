"""`HierarchicalMergeCallback`: HAM's task boundary in Lightning (merge, then evaluate every seen task)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from typing_extensions import override

from ham_lightning.core.controller import HAMController, MergeDecision, find_controller
from ham_lightning.core.distributed import rank_rows, world
from ham_lightning.lightning.sequence import ContinualEvaluation
from ham_lightning.lightning.statistics import rows_of, task_heads


class HierarchicalMergeCallback(ContinualEvaluation):
    """At each task boundary: similarity, assignment, prune, scale, merge, reset (``HAMController.end_task``).

    Works on `HAMModule` and on any LightningModule whose backbone went through `ham_lightning.inject` (the
    controller is found on the module), with all of HAM on both: with ``HAMConfig(protect_inputs=...)`` it keeps
    each new adapter off earlier tasks' input subspaces (at each task's start and after every training batch) and
    runs the pass that collects them after each merge; statistics heads (`ham_lightning.core.heads`) in the
    module are fitted in that same pass (see `ContinualEvaluation`). The optimizer and LR schedulers restart for the next task (see
    `ContinualEvaluation`). The merge history has one owner, the controller (``find_controller(model).history``),
    saved in the model's ``state_dict``; this callback only reads it.

    Args:
        epochs_per_task: see `ContinualEvaluation`.
        evaluate: evaluate every seen task after each merge (the accuracy matrix).
    """

    def __init__(self, epochs_per_task: int | None = None, evaluate: bool = True) -> None:
        super().__init__(epochs_per_task=epochs_per_task, evaluate=evaluate)
        # The controller of the module being fitted (found at fit start), whose history `results` reports.
        self._controller: HAMController | None = None

    @property
    def history(self) -> list[MergeDecision]:
        """The merge history of the fitted model's controller (empty before the first fit)."""
        return self._controller.history if self._controller is not None else []

    @staticmethod
    def controller(pl_module: LightningModule) -> HAMController | None:
        """The module's controller; None for a module that declares a frozen backbone (``adapt=False``)."""
        controller = find_controller(pl_module)
        if controller is None and getattr(pl_module, "adapt", True) is False:
            return None  # a training-free head on a frozen backbone: boundaries and evaluation, no merge
        if controller is None:
            raise MisconfigurationException(
                f"{type(pl_module).__name__} has no HAM layers. Use ham_lightning.HAMModule, or call "
                "ham_lightning.inject(your_backbone, HAMConfig(...)) in your LightningModule's __init__."
            )
        return controller

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        controller = self._controller = self.controller(pl_module)
        if controller is not None and len(controller.history) != self._task:
            raise MisconfigurationException(
                f"The model has merged {len(controller.history)} tasks but this callback is at task {self._task}. "
                "Pass the same HierarchicalMergeCallback instance to every task's Trainer (it holds the sequence's "
                "state), or resume from a checkpoint that has both."
            )
        self._fit_starting = True
        try:
            super().on_fit_start(trainer, pl_module)
        finally:
            self._fit_starting = False

    @override
    def _start_task(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super()._start_task(trainer, pl_module)
        controller = self._controller
        if controller is None:
            return
        # A fit's start (a resume, or the next fit of a one-fit-per-task loop) starts the task again: the boundary
        # already projected the fresh adapter and observed the task, and a second A(I-P) would change A's last
        # bits (a resumed run would then differ from an uninterrupted one).
        # The task's data is observed first: it plans the slot whose subspace a group-scoped protection uses.
        if controller.router is not None and not controller.router.has_task_statistics:
            self.observe_task(trainer, pl_module)
        if controller.config.adapter_init == "inputs" and controller.adapter_is_fresh:
            # After the slot is planned, A comes off that slot's subspace by construction; computed again alike
            # when a fit resumes before the task's first step, so no second A(I-P) is applied either way.
            self.init_adapter(trainer, pl_module)
        elif not getattr(self, "_fit_starting", False) or controller.num_tasks_merged == 0:
            controller.protect_()  # the fresh adapter starts off the old tasks' subspace

    @torch.no_grad()
    def observe_task(self, trainer: Trainer, pl_module: LightningModule) -> list[float | None]:
        """The current task's data statistics for routing and data similarity (`HAMController.observe_task`):
        one pass over its training data in a fixed order (the shuffling generator is not touched, so a resumed
        run observes exactly what the uninterrupted one did) through the module's forward, stopped at the
        adapted part."""
        controller = self._controller
        assert controller is not None
        with self._task_batches(trainer, pl_module) as batches:
            return controller.observe_task(batches, pl_module)

    @torch.no_grad()
    def init_adapter(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``adapter_init="inputs"``: the fresh adapter's ``A`` from the current task's inputs to each layer
        (`HAMController.init_adapter_from_inputs`), one pass in the same fixed order as `observe_task`."""
        controller = self._controller
        assert controller is not None
        with self._task_batches(trainer, pl_module) as batches:
            controller.init_adapter_from_inputs(batches, pl_module)

    @contextlib.contextmanager
    def _task_batches(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[Iterator[Any]]:
        """The current task's training batches in a fixed order, this rank's block of each (under DDP the
        sums over them are added up over the ranks), with the module in eval mode."""
        train = self._datamodule(trainer).train_dataloader()
        loader = DataLoader(train.dataset, batch_size=train.batch_size or 256, shuffle=False)
        was_training = pl_module.training
        pl_module.eval()
        rank, size = world()
        shares = ((x, rank_rows(len(y), rank, size)) for x, y in loader)
        try:
            yield (move_data_to_device(rows_of(x, rows), pl_module.device) for x, rows in shares
                   if rows.stop > rows.start)
        finally:
            pl_module.train(was_training)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._controller is not None:
            self._controller.protect_()  # keep A off the old tasks' subspace after every optimizer step

    @override
    def _statistics_pass(self, trainer: Trainer, pl_module: LightningModule,
                         collecting: contextlib.AbstractContextManager[Any] | None = None) -> None:
        controller = self._controller
        if controller is None or not controller.needs_input_pass:
            super()._statistics_pass(trainer, pl_module, collecting)
            return
        with contextlib.ExitStack() as stack:  # the heads' statistics and the input moments in one pass
            if collecting is not None:
                stack.enter_context(collecting)
            super()._statistics_pass(trainer, pl_module, controller.collecting_inputs())
        controller.update_protection()

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> dict[str, float]:
        controller = self.controller(pl_module)
        if controller is None:
            return {}
        decision = controller.end_task()
        for head in task_heads(pl_module):  # before the statistics pass: a head per group learns the task's slot
            head.on_group(decision.group)
        metrics = {"ham/group": float(decision.group), "ham/opened": float(decision.opened),
                   "ham/num_groups": float(controller.num_groups), "ham/importance": decision.importance,
                   "ham/kept_fraction": decision.kept_fraction}
        for g, s in enumerate(decision.similarities):
            if s is not None:
                metrics[f"ham/similarity_group_{g}"] = s
        return metrics

    @override
    def results(self) -> dict[str, Any]:
        out = super().results()
        if self.history:
            out["groups"] = {
                "max_groups": len(self.history[0].similarities),
                "assignment": [d.group for d in self.history],
                "opened": [d.opened for d in self.history],
                "similarities": [d.similarities for d in self.history],
                "importance": [d.importance for d in self.history],
                "kept_fraction": [d.kept_fraction for d in self.history],
                "group_ranks": [d.group_ranks for d in self.history],
            }
        return out

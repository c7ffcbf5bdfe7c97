"""`HierarchicalMergeCallback`: HAM's task boundary in Lightning (merge, then evaluate every seen task)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from ham_lightning.core.controller import HAMController, MergeDecision, find_controller
from ham_lightning.lightning.sequence import ContinualEvaluation


class HierarchicalMergeCallback(ContinualEvaluation):
    """At each task boundary: similarity, assignment, prune, scale, merge, reset (``HAMController.end_task``).

    Works on `HAMModule` and on any LightningModule whose backbone went through `ham_lightning.inject` (the
    controller is found on the module). The optimizer and LR schedulers restart for the next task (see
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
        super().on_fit_start(trainer, pl_module)

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> dict[str, float]:
        controller = self.controller(pl_module)
        if controller is None:
            return {}
        decision = controller.end_task()
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

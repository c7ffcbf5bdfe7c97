"""The Lightning plug-in over the core: module, sequence driver, merge callback, evaluation, progress, results."""

from ham_lightning.lightning.callback import HierarchicalMergeCallback
from ham_lightning.lightning.module import HAMModule
from ham_lightning.lightning.sequence import ContinualEvaluation
from ham_lightning.lightning.task_protocol import TaskProtocol

__all__ = ["ContinualEvaluation", "HAMModule", "HierarchicalMergeCallback", "TaskProtocol"]

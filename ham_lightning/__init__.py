"""ham-lightning: HAM (Hierarchical Adapters Merging) continual learning for PyTorch Lightning and timm."""

from ham_lightning.callback import HierarchicalMergeCallback
from ham_lightning.config import HAMConfig
from ham_lightning.continual import ContinualEvaluation
from ham_lightning.controller import HAMController, MergeDecision, find_controller, inject
from ham_lightning.data import ClassIncrementalDataModule
from ham_lightning.head import IncrementalHead
from ham_lightning.layer import HAMLayer
from ham_lightning.module import HAMModule
from ham_lightning.task_protocol import TaskProtocol

__all__ = [
    "ClassIncrementalDataModule",
    "ContinualEvaluation",
    "HAMConfig",
    "HAMController",
    "HAMLayer",
    "HAMModule",
    "HierarchicalMergeCallback",
    "IncrementalHead",
    "MergeDecision",
    "TaskProtocol",
    "find_controller",
    "inject",
]
__version__ = "0.1.0"

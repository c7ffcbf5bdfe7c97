"""ham-lightning: HAM (Hierarchical Adapters Merging) continual learning for PyTorch Lightning and timm.

Layout (imports run one way, ``cli -> lightning -> core``):

* `ham_lightning.core`: pure PyTorch (no Lightning import): the HAM layer, merge algebra, merge rules, heads,
  controller, config, backbones, export;
* `ham_lightning.lightning`: the Lightning plug-in: `HAMModule`, the sequence driver, the merge callback,
  evaluation, progress, results;
* `ham_lightning.data`: the class-incremental datamodule; `ham_lightning.report`; `ham_lightning.cli` on top.

The public names below load lazily, so ``import ham_lightning.core`` never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "HAMConfig": "ham_lightning.core.config",
    "HAMController": "ham_lightning.core.controller",
    "MergeDecision": "ham_lightning.core.controller",
    "find_controller": "ham_lightning.core.controller",
    "inject": "ham_lightning.core.controller",
    "HAMLayer": "ham_lightning.core.layer",
    "IncrementalHead": "ham_lightning.core.heads",
    "ContinualEvaluation": "ham_lightning.lightning.sequence",
    "HierarchicalMergeCallback": "ham_lightning.lightning.callback",
    "HAMModule": "ham_lightning.lightning.module",
    "TaskProtocol": "ham_lightning.lightning.task_protocol",
    "TaskAware": "ham_lightning.lightning.task_protocol",
    "Head": "ham_lightning.core.head",
    "NCMHead": "ham_lightning.core.heads",
    "RidgeHead": "ham_lightning.core.heads",
    "AlignedHead": "ham_lightning.core.heads",
    "ClassIncrementalDataModule": "ham_lightning.data",
}

__all__ = [
    "AlignedHead", "ClassIncrementalDataModule", "ContinualEvaluation", "HAMConfig", "HAMController", "HAMLayer",
    "HAMModule", "Head", "HierarchicalMergeCallback", "IncrementalHead", "MergeDecision", "NCMHead", "RidgeHead",
    "TaskAware", "TaskProtocol", "find_controller", "inject",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ham_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from ham_lightning.core.config import HAMConfig
    from ham_lightning.core.controller import HAMController, MergeDecision, find_controller, inject
    from ham_lightning.core.head import Head
    from ham_lightning.core.heads import AlignedHead, IncrementalHead, NCMHead, RidgeHead
    from ham_lightning.core.layer import HAMLayer
    from ham_lightning.data import ClassIncrementalDataModule
    from ham_lightning.lightning.callback import HierarchicalMergeCallback
    from ham_lightning.lightning.module import HAMModule
    from ham_lightning.lightning.sequence import ContinualEvaluation
    from ham_lightning.lightning.task_protocol import TaskAware, TaskProtocol

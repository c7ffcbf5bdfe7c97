"""The pure-PyTorch core of HAM (no Lightning import): layer, algebra, merge rules, heads, controller, config."""

from ham_lightning.core.config import HAMConfig
from ham_lightning.core.controller import HAMController, MergeDecision, find_controller, inject
from ham_lightning.core.heads import IncrementalHead
from ham_lightning.core.layer import HAMLayer

__all__ = ["HAMConfig", "HAMController", "HAMLayer", "IncrementalHead", "MergeDecision", "find_controller", "inject"]

"""Data: class-incremental scenarios over data sets as users download them.

`ClassIncrementalDataModule` is the entry point; the helpers below are usable on their own (class orders, task
splits, timm-derived transforms, the readers).
"""

from .class_order import DEFAULT_SEED, resolve_class_order, seed_class_order
from .datamodule import ClassIncrementalDataModule
from .readers import READERS, DatasetReader, ReadOptions, SplitData, build_reader, register_reader
from .sampler import TaskRandomSampler
from .task_dataset import TaskDataset
from .task_split import task_ranges, task_sizes
from .transforms import DataConfig, backbone_data_config, build_transform, resolve_data_config

__all__ = [
    "DEFAULT_SEED",
    "READERS",
    "ClassIncrementalDataModule",
    "DataConfig",
    "DatasetReader",
    "ReadOptions",
    "SplitData",
    "TaskDataset",
    "TaskRandomSampler",
    "backbone_data_config",
    "build_reader",
    "build_transform",
    "register_reader",
    "resolve_class_order",
    "resolve_data_config",
    "seed_class_order",
    "task_ranges",
    "task_sizes",
]

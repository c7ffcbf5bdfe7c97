"""Datasets over a built prefix-activation cache (`ham_lightning.data.feature_cache`): the memory-mapped entry,
a task's samples as ``({"prefix": h}, label)``, and an image store decoded only when a cache must be built."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ham_lightning.core.prefix import PREFIX_KEY

from .image_store import ImageStore
from .task_dataset import sample_seed


def epoch_view(epoch_seed: int, index: int, views: int) -> int:
    """The view of image ``index`` an epoch with ``epoch_seed`` reads (`TaskDataset`'s per-sample seed mix)."""
    return sample_seed(epoch_seed, index) % views


class CachedFeatures:
    """A built cache entry: the ``N x V x *h`` activations of a split, opened lazily (and again in each loader
    worker, so a worker never pickles the memory map's data)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._array

    @property
    def views(self) -> int:
        return int(self.array.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one image's activations ``h``."""
        return tuple(self.array.shape[2:])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def get(self, index: int, view: int = 0) -> torch.Tensor:
        """View ``view`` of image ``index`` as a float32 tensor."""
        return torch.from_numpy(np.array(self.array[index, view], dtype=np.float32))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_array": None}


class CachedTaskDataset(Dataset[tuple[dict[str, torch.Tensor], int]]):
    """`TaskDataset`'s cached counterpart: ``({"prefix": h}, global label)`` for positions ``indices``.

    A key ``(position, epoch_seed)`` from `TaskRandomSampler` reads view `epoch_view(epoch_seed, index)`; a plain
    position reads view 0.
    """

    def __init__(self, features: CachedFeatures, labels: torch.Tensor, indices: np.ndarray) -> None:
        self.features = features
        self.labels = labels
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[dict[str, torch.Tensor], int]:
        position, epoch_seed = key if isinstance(key, tuple) else (key, None)
        index = int(self.indices[position])
        views = self.features.views
        view = 0 if epoch_seed is None or views == 1 else epoch_view(epoch_seed, index, views)
        return {PREFIX_KEY: self.features.get(index, view)}, int(self.labels[index])

    def targets(self) -> torch.Tensor:
        """Global labels of the samples, in dataset order."""
        return self.labels[torch.from_numpy(self.indices)]


class LazyImageStore(ImageStore):
    """An image store built on first use: with a cache hit the images are never decoded."""

    def __init__(self, count: int, build: Callable[[], ImageStore]) -> None:
        self._count, self._build, self._store = count, build, None

    @property
    def store(self) -> ImageStore:
        if self._store is None:
            self._store = self._build()
        return self._store

    def __len__(self) -> int:
        return self._count

    def get(self, index: int) -> torch.Tensor:
        return self.store.get(index)

"""The samples of one task in one split, with reproducible per-sample augmentation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .image_store import ImageStore

_GOLDEN = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1


def sample_seed(epoch_seed: int, index: int) -> int:
    """Seed of one sample's augmentation in one epoch (a fixed mix of both, so no two samples share it)."""
    mixed = (epoch_seed ^ ((index + 1) * _GOLDEN)) & ((1 << 64) - 1)
    mixed = ((mixed ^ (mixed >> 31)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    return (mixed ^ (mixed >> 29)) & _MASK63


class TaskDataset(Dataset[tuple[torch.Tensor, int]]):
    """``(image, global label)`` pairs for the positions ``indices`` of a split's image store.

    A key is a position, or ``(position, epoch_seed)`` from `TaskRandomSampler`: then the transform runs under a
    CPU RNG seeded from the pair, so augmentation depends only on the sampler's generator, not on the global RNG,
    the number of workers or which worker serves the sample.
    """

    def __init__(
        self,
        store: ImageStore,
        labels: torch.Tensor,
        indices: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.store = store
        self.labels = labels
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        position, epoch_seed = key if isinstance(key, tuple) else (key, None)
        index = int(self.indices[position])
        image = self.store.get(index)
        if self.transform is not None:
            if epoch_seed is None:
                image = self.transform(image)
            else:
                # fork_rng restores the caller's CPU RNG; default_generator is seeded (not torch.manual_seed) so
                # no CUDA generator is touched.
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(sample_seed(epoch_seed, index))
                    image = self.transform(image)
        return image, int(self.labels[index])

    def targets(self) -> torch.Tensor:
        """Global labels of the samples, in dataset order (no image is read)."""
        return self.labels[torch.from_numpy(self.indices)]

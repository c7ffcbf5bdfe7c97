"""Shuffling of a task's training samples driven by that task's own generator."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import RandomSampler


def task_seed(seed: int, task: int, stream: int) -> int:
    """A well-mixed 64-bit seed for (seed, task, stream); streams keep shuffling and worker seeds apart."""
    return int(np.random.SeedSequence([seed, task, stream]).generate_state(1, dtype=np.uint64)[0])


class TaskRandomSampler(RandomSampler):
    """A `RandomSampler` (so Lightning sees a shuffled loader) that also hands out an epoch seed.

    Each pass draws a permutation and one epoch seed from ``generator`` and yields ``(position, epoch_seed)``;
    `TaskDataset` seeds the sample's augmentation from it. Epoch ``e`` therefore sees the same order and the same
    augmentations whether the loader is iterated ``e + 1`` times or rebuilt around the same generator.
    There is deliberately no ``set_epoch``: the order depends on the passes made, not on the trainer's epoch
    counter, which differs between one fit per task and one long fit.
    """

    def __init__(self, data_source: Sized, generator: torch.Generator) -> None:
        super().__init__(data_source, generator=generator)
        self.generator: torch.Generator = generator

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        n = len(self.data_source)
        order = torch.randperm(n, generator=self.generator).tolist()
        epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        for position in order:
            yield position, epoch_seed

"""Shuffling of a task's training samples driven by that task's own generator."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, RandomSampler, Sampler

from ham_lightning.core.distributed import world


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


class TaskDistributedSampler(DistributedSampler):
    """A rank's share of a task's shuffled order under DDP: `TaskRandomSampler`'s order and epoch seed, from the
    task's generator, cut across the ranks.

    Every rank holds the same generator, so each pass draws the same permutation everywhere (the order does not
    depend on the number of processes); rank ``r`` takes positions ``r, r + W, ...``, padded by repeating the
    first positions so all ranks run the same number of steps (as `DistributedSampler` does). Being a
    `DistributedSampler`, Lightning leaves it in place instead of replacing it with its own (which would
    reshuffle by the trainer's epoch and drop the per-sample augmentation seed). ``set_epoch`` changes nothing:
    the order follows the passes made, as in one process.
    """

    def __init__(self, data_source: Sized, generator: torch.Generator, num_replicas: int, rank: int) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.data_source, self.generator = data_source, generator

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        drawn = list(self.undistributed())
        drawn += drawn[: self.total_size - len(drawn)] if drawn else []
        return iter(drawn[self.rank: self.total_size: self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        """Nothing: the order is drawn from the task's generator pass by pass."""

    def undistributed(self) -> TaskRandomSampler:
        """The whole task's order, drawn from the same generator (the statistics pass, on every rank)."""
        return TaskRandomSampler(self.data_source, self.generator)


def task_sampler(dataset: Sized, generator: torch.Generator, trainer: Any = None) -> Sampler:
    """The task's shuffled order (`TaskRandomSampler`); under DDP this rank's share of it (`TaskDistributedSampler`),
    the rank and world size from ``trainer`` when given, else from ``torch.distributed``."""
    rank, size = (trainer.global_rank, trainer.world_size) if trainer is not None else world()
    if size > 1:
        return TaskDistributedSampler(dataset, generator, num_replicas=size, rank=rank)
    return TaskRandomSampler(dataset, generator)

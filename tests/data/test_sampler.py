"""`TaskDistributedSampler`: each rank's share of the task's seeded order; together, the order of one process."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

from ham_lightning.data.sampler import TaskDistributedSampler, TaskRandomSampler, task_sampler


def test_rank_shares_cover_the_one_process_order_pass_after_pass() -> None:
    data = list(range(10))
    single = TaskRandomSampler(data, torch.Generator().manual_seed(3))
    shares = [TaskDistributedSampler(data, torch.Generator().manual_seed(3), num_replicas=3, rank=r) for r in range(3)]
    for _ in range(2):  # two passes: each draws the next permutation and epoch seed from the task's generator
        expected = list(single)
        drawn = [list(s) for s in shares]
        assert [len(d) for d in drawn] == [4, 4, 4] == [len(s) for s in shares]  # padded: equal steps per rank
        interleaved = [drawn[i % 3][i // 3] for i in range(12)]
        assert interleaved[:10] == expected and interleaved[10:] == expected[:2]
        for s in shares:
            s.set_epoch(7)  # Lightning's call changes nothing
    assert list(shares[0].undistributed()) == list(single)  # the statistics pass: the whole order, same generator


def test_task_sampler_shards_only_under_more_than_one_process() -> None:
    class Trainer:
        global_rank, world_size = 1, 2

    g = torch.Generator().manual_seed(0)
    assert type(task_sampler(list(range(4)), g)) is TaskRandomSampler  # torch.distributed not initialised
    shared = task_sampler(list(range(4)), g, Trainer())
    assert isinstance(shared, DistributedSampler) and shared.rank == 1 and len(shared) == 2

"""A tiny in-test scenario: Gaussian class clusters split into tasks, and an MLP backbone with timm-like names."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import ham_lightning


class MLPBackbone(nn.Module):
    """``fc1 -> GELU -> fc2``: two adaptable Linear layers and ``num_features`` like a timm model."""

    def __init__(self, in_features: int = 24, hidden: int = 32, num_features: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_features)
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class One(nn.Module):
    """A model of one adaptable layer ``0`` (for the core's layer-level tests)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.add_module("0", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule("0")(x)


class PassSampler(Sampler[int]):
    """One permutation per pass, drawn when the pass starts (``RandomSampler`` draws an extra one at exhaustion,
    so its stream depends on whether the last pass ran to the end)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class ToyTaskData(pl.LightningDataModule):
    """``num_tasks`` tasks of ``classes_per_task`` Gaussian clusters; implements `ham_lightning.TaskProtocol`.

    Each task's shuffling comes from a generator seeded by (seed, task) and created when the task starts, so
    one fit per task and one fit over the sequence see the same batches.
    """

    def __init__(self, num_tasks: int = 3, classes_per_task: int = 2, dim: int = 24, train_per_class: int = 48,
                 test_per_class: int = 24, batch_size: int = 16, seed: int = 0, epochs_per_task: int | None = None
                 ) -> None:
        super().__init__()
        self.num_tasks, self.num_classes = num_tasks, num_tasks * classes_per_task
        self.classes_per_task, self.batch_size, self.seed = classes_per_task, batch_size, seed
        self.epochs_per_task = epochs_per_task
        self.current_task = 0
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(self.num_classes, dim, generator=g) * 1.5

        def sample(n: int) -> TensorDataset:
            y = torch.arange(self.num_classes).repeat_interleave(n)
            return TensorDataset(centers[y] + torch.randn(len(y), dim, generator=g), y)

        self.train_set, self.test_set = sample(train_per_class), sample(test_per_class)
        self._generator = torch.Generator().manual_seed(seed)

    def set_task(self, task: int) -> None:
        self._generator = torch.Generator().manual_seed(self.seed * 1000 + task)
        self.current_task = task

    def task_classes(self, task: int) -> Sequence[int]:
        return list(range(task * self.classes_per_task, (task + 1) * self.classes_per_task))

    def _subset(self, data: TensorDataset, task: int) -> TensorDataset:
        x, y = data.tensors
        keep = (y >= task * self.classes_per_task) & (y < (task + 1) * self.classes_per_task)
        return TensorDataset(x[keep], y[keep])

    def train_dataloader(self) -> DataLoader:
        data = self._subset(self.train_set, self.current_task)
        return DataLoader(data, batch_size=self.batch_size, sampler=PassSampler(len(data), self._generator))

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self._subset(self.test_set, t), batch_size=64) for t in range(self.current_task + 1)]

    def state_dict(self) -> dict[str, Any]:
        return {"current_task": self.current_task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_task = state_dict["current_task"]


def toy_model(max_groups: int = 2, lr: float = 0.02, num_classes: int = 6, **ham: Any) -> ham_lightning.HAMModule:
    """`HAMModule` on `MLPBackbone` for a `ToyTaskData` (3 tasks x 2 classes by default)."""
    config = ham_lightning.HAMConfig(target_modules=["fc1", "fc2"], rank=4, max_groups=max_groups, group_rank=8,
                                     **ham)
    return ham_lightning.HAMModule(MLPBackbone(), num_classes=num_classes, ham=config,
                                   optimizer=lambda params: torch.optim.AdamW(params, lr=lr))


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, progress bar, summary or checkpoints unless asked."""
    args: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    args.update(kwargs)
    return pl.Trainer(**args)

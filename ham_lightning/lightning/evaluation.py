"""Continual-learning metrics: one torchmetrics `TaskAccuracy` for every accuracy reported, and the accuracy matrix.

``A[i][j]`` is the micro accuracy on task ``j``'s test set after training task ``i`` (``j <= i``), predictions made
among every class seen so far. Counts (correct, total) are kept so union accuracies are exact micro averages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

Counts = tuple[int, int]  # (correct, total)


def continual_metrics(rows: Sequence[Sequence[Counts]]) -> dict[str, object]:
    """Accuracy matrix (percent, ``None`` above the diagonal) and the summary metrics of protocol.md.

    ``rows[i][j]`` holds (correct, total) on task ``j`` after task ``i``. Forgetting and BWT are 0.0 for a single
    task (no earlier task to forget).
    """
    T = len(rows)
    acc = [[100.0 * c / n if n else 0.0 for c, n in row] for row in rows]
    matrix = [[acc[i][j] if j <= i else None for j in range(T)] for i in range(T)]
    incremental = [100.0 * sum(c for c, _ in row) / max(1, sum(n for _, n in row)) for row in rows]
    if T > 1:
        forgetting = sum(max(acc[i][j] for i in range(j, T - 1)) - acc[T - 1][j] for j in range(T - 1)) / (T - 1)
        bwt = sum(acc[T - 1][j] - acc[j][j] for j in range(T - 1)) / (T - 1)
    else:
        forgetting = bwt = 0.0
    return {
        "accuracy_matrix": matrix,
        "incremental_accuracy": incremental,
        "last_accuracy": incremental[-1] if T else 0.0,
        "average_incremental_accuracy": sum(incremental) / T if T else 0.0,
        "forgetting": forgetting,
        "bwt": bwt,
    }


class TaskAccuracy(Metric):
    """Micro accuracy of each task: per-task correct and total counts, summed over processes under DDP.

    Every accuracy the project reports comes from it: the accuracy matrix at task boundaries (`evaluate_tasks`)
    and the ``val`` / ``test`` accuracies of `HAMModule`. ``update`` takes logits (``N x C``, argmax taken) or
    predicted classes (``N``) and the task the batch belongs to.

    Example:
        >>> metric = TaskAccuracy(num_tasks=2)
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), task=0)
        >>> metric.update(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]), task=1)
        >>> metric.counts()
        [(1, 2), (2, 3)]
        >>> metric.compute()
        tensor([0.5000, 0.6667])
        >>> metric.log_dict("val")
        {'val/acc_task_0': tensor(0.5000), 'val/acc_task_1': tensor(0.6667)}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.add_state("correct", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, task: int = 0) -> None:
        """Count ``preds`` (logits or classes) against ``target`` for ``task``."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} is outside 0..{self.num_tasks - 1}: create TaskAccuracy(num_tasks=...) "
                             "with room for every task")
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=-1)
        if preds.shape != target.shape:
            raise ValueError(f"preds of shape {tuple(preds.shape)} do not match target of shape {tuple(target.shape)}")
        self.correct[task] += (preds == target).sum()
        self.total[task] += target.numel()

    def compute(self) -> Tensor:
        """Accuracy (a fraction) of each task; 0 for a task without samples."""
        return self.correct.double().div(self.total.clamp_min(1)).float()

    def counts(self) -> list[Counts]:
        """``(correct, total)`` of each task, summed over processes."""
        with self.sync_context():
            return [(int(c), int(n)) for c, n in zip(self.correct.tolist(), self.total.tolist())]

    def log_dict(self, prefix: str, key: str = "{prefix}/acc_task_{task}") -> dict[str, Tensor]:
        """The accuracy of every task that has samples, keyed by ``key``, for ``LightningModule.log_dict``."""
        acc = self.compute().reshape(-1)  # torchmetrics squeezes one task's accuracy to a scalar
        with self.sync_context():
            present = (self.total > 0).tolist()
        return {key.format(prefix=prefix, task=j): acc[j] for j in range(self.num_tasks) if present[j]}


def _rank_share(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """The rank's strided share of ``loader``'s dataset, unpadded so every sample is counted exactly once.

    Lightning's own distributed sampler for evaluation pads the last batch by repeating samples, which would
    count them twice; its `UnrepeatedDistributedSampler` does not.
    """
    if world == 1:
        return loader
    sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


@torch.no_grad()
def evaluate_tasks(
    model: Callable[[Any], Tensor],
    loaders: Sequence[DataLoader],
    seen_classes: Sequence[int],
    num_classes: int,
    device: torch.device,
    trainer: Trainer | None = None,
    confusion: MulticlassConfusionMatrix | None = None,
) -> list[Counts]:
    """(correct, total) per loader (one per task), predicting among ``seen_classes`` only; summed over ranks.

    Batches are ``(x, y)`` where ``x`` is a tensor or any collection of tensors (a dict of cached features), given
    to ``model`` as is after moving to ``device``. With ``trainer``, the forward runs in its precision context
    (autocast for mixed precision, the input conversion of true half precision) and each rank evaluates its
    share of every loader; without, the share comes from ``torch.distributed`` when it is initialised.
    With ``confusion`` (over ``num_classes``), every prediction is also counted there (see `error_breakdown`).
    """
    if trainer is not None:
        rank, world = trainer.global_rank, trainer.world_size
        precision = trainer.precision_plugin
        convert, context = precision.convert_input, precision.forward_context
    else:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        convert, context = (lambda batch: batch), contextlib.nullcontext
    seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
    seen[torch.as_tensor(list(seen_classes), device=device)] = True
    metric = TaskAccuracy(num_tasks=max(1, len(loaders))).to(device)
    for task, loader in enumerate(loaders):
        for batch in _rank_share(loader, rank, world):
            x, y = move_data_to_device(convert(batch), device)
            with context():
                logits = model(x)
            if logits.shape[-1] != num_classes:
                raise ValueError(
                    f"The model returns {logits.shape[-1]} logits but the scenario has {num_classes} classes: give the "
                    f"model's head num_classes={num_classes} (the datamodule's num_classes)."
                )
            logits = logits.float().masked_fill(~seen, float("-inf"))
            metric.update(logits, y, task=task)
            if confusion is not None:
                confusion.update(logits, y)
    return metric.counts()[: len(loaders)]


def error_breakdown(confmat: Tensor, class_task: dict[int, int], task_domains: Sequence[str] | None = None
                    ) -> dict[str, Any]:
    """Where the wrong predictions of one evaluation went, in percent of the images evaluated.

    ``confmat[i, k]`` counts images of class ``i`` predicted as ``k`` (torchmetrics' `MulticlassConfusionMatrix`);
    ``class_task`` gives each evaluated class its task. ``confusions`` lists every off-diagonal count as
    ``[true, predicted, count]``, so other partitions can be scored later (`error_shares`).
    """
    counts = confmat.detach().cpu().long()
    off = counts.clone()
    off.fill_diagonal_(0)
    true, pred = off.nonzero(as_tuple=True)
    confusions = [[int(i), int(k), int(off[i, k])] for i, k in zip(true.tolist(), pred.tolist())]
    total = int(counts.sum())
    return {"images": total, **error_shares(confusions, total, class_task, task_domains), "confusions": confusions}


def error_shares(confusions: Sequence[Sequence[int]], images: int, class_task: dict[int, int],
                 task_domains: Sequence[str] | None = None) -> dict[str, float]:
    """``wrong`` and its parts in percent of ``images``, from ``[true, predicted, count]`` confusions.

    An error is ``within_task`` (a class of the image's own task), else ``other_task``; with ``task_domains`` (the
    source of every task, a mixed-domain scenario) those are split into ``other_task_same_domain`` and
    ``other_domain``. The errors into another task are also split by when that task came: ``to_later_task``
    (a class learned after the image's own: recency) and ``to_earlier_task``.
    """
    share: dict[str, float] = {}
    for i, k, n in confusions:
        if class_task.get(i) == class_task.get(k):
            key = "within_task"
        elif task_domains is None or i not in class_task or k not in class_task:
            key = "other_task"
        else:
            same = task_domains[class_task[i]] == task_domains[class_task[k]]
            key = "other_task_same_domain" if same else "other_domain"
        share[key] = share.get(key, 0.0) + n
        if key != "within_task" and i in class_task and k in class_task:
            when = "to_later_task" if class_task[k] > class_task[i] else "to_earlier_task"
            share[when] = share.get(when, 0.0) + n
    keys = ["within_task", *(["other_task"] if task_domains is None else ["other_task_same_domain", "other_domain"]),
            "to_later_task", "to_earlier_task"]
    return {"wrong": 100.0 * sum(n for *_, n in confusions) / max(1, images),
            **{key: 100.0 * share.get(key, 0.0) / max(1, images) for key in keys}}

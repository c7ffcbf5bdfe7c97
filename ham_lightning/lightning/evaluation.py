"""Continual-learning metrics: the accuracy matrix and what protocol.md derives from it.

``A[i][j]`` is the micro accuracy on task ``j``'s test set after training task ``i`` (``j <= i``), predictions made
among every class seen so far. Counts (correct, total) are kept so union accuracies are exact micro averages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassStatScores

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


def _shard(loader: DataLoader) -> DataLoader:
    """Under torch.distributed, the rank's strided share of the loader's dataset (no padding, exact counts)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loader
    rank, world = dist.get_rank(), dist.get_world_size()
    subset = Subset(loader.dataset, range(rank, len(loader.dataset), world))  # type: ignore[arg-type]
    return DataLoader(subset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


@torch.no_grad()
def evaluate_tasks(
    logits_fn: Callable[[Tensor], Tensor],
    loaders: Iterable[DataLoader],
    seen_classes: Sequence[int],
    num_classes: int,
    device: torch.device,
) -> list[Counts]:
    """(correct, total) per loader, predicting among ``seen_classes`` only; summed over ranks under DDP."""
    seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
    seen[torch.as_tensor(list(seen_classes), device=device)] = True
    out = []
    for loader in loaders:
        stats = MulticlassStatScores(num_classes=num_classes, average="micro").to(device)
        for x, y in _shard(loader):
            logits = logits_fn(x.to(device, non_blocking=True))
            if logits.shape[-1] != num_classes:
                raise ValueError(
                    f"The model returns {logits.shape[-1]} logits but the scenario has {num_classes} classes: give the "
                    f"model's head num_classes={num_classes} (the datamodule's num_classes)."
                )
            preds = logits.float().masked_fill(~seen, float("-inf")).argmax(dim=1)
            stats.update(preds, y.to(device))
        tp, _, _, _, support = stats.compute().tolist()  # micro: tp = correct, support = total
        out.append((int(tp), int(support)))
    return out

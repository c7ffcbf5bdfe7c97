"""Continual metrics from the accuracy matrix (protocol.md definitions) and the micro accuracy of evaluate_tasks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ham_lightning.lightning.evaluation import continual_metrics, evaluate_tasks


def test_metrics_match_protocol_definitions() -> None:
    # rows[i][j] = (correct, total) of task j after task i; 3 tasks, task sizes 10, 20, 10.
    rows = [[(8, 10)], [(6, 10), (18, 20)], [(5, 10), (12, 20), (9, 10)]]
    m = continual_metrics(rows)
    A = [[80.0], [60.0, 90.0], [50.0, 60.0, 90.0]]
    assert m["accuracy_matrix"] == [[80.0, None, None], [60.0, 90.0, None], [50.0, 60.0, 90.0]]
    # union accuracy (micro over samples), not the mean of per-task accuracies
    assert m["incremental_accuracy"] == pytest.approx([80.0, 100 * 24 / 30, 100 * 26 / 40])
    assert m["last_accuracy"] == pytest.approx(65.0)
    assert m["average_incremental_accuracy"] == pytest.approx((80.0 + 80.0 + 65.0) / 3)
    # forgetting: mean_j<T (max_{i<T} A[i][j] - A[T][j]); BWT: mean_j<T (A[T][j] - A[j][j])
    assert m["forgetting"] == pytest.approx(((max(A[0][0], A[1][0]) - A[2][0]) + (A[1][1] - A[2][1])) / 2)
    assert m["bwt"] == pytest.approx(((A[2][0] - A[0][0]) + (A[2][1] - A[1][1])) / 2)


def test_single_task_has_no_forgetting() -> None:
    m = continual_metrics([[(3, 4)]])
    assert m["forgetting"] == 0.0 and m["bwt"] == 0.0 and m["last_accuracy"] == 75.0


def test_evaluate_tasks_counts_micro_accuracy_among_seen_classes() -> None:
    # Logits favour class 5 (unseen) for every sample; masked to seen classes {0, 1} the argmax is 1.
    x = torch.zeros(6, 1)
    y = torch.tensor([1, 1, 1, 0, 0, 1])

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(batch.shape[0], 6)
        out[:, 5] = 10.0
        out[:, 1] = 1.0
        return out

    loaders = [DataLoader(TensorDataset(x[:4], y[:4]), batch_size=3), DataLoader(TensorDataset(x[4:], y[4:]))]
    counts = evaluate_tasks(logits_fn, loaders, seen_classes=[0, 1], num_classes=6, device=torch.device("cpu"))
    assert counts == [(3, 4), (1, 2)]


def test_evaluate_tasks_refuses_a_head_of_the_wrong_size() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="returns 3 logits but the scenario has 6 classes"):
        evaluate_tasks(lambda b: torch.zeros(b.shape[0], 3), [loader], [0], 6, torch.device("cpu"))

"""Continual metrics from the accuracy matrix (protocol.md definitions) and the micro accuracy of evaluate_tasks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ham_lightning.lightning.evaluation import continual_metrics, error_breakdown, evaluate_tasks


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


def test_evaluate_tasks_counts_every_prediction_among_seen_classes_in_the_confusion() -> None:
    from torchmetrics.classification import MulticlassConfusionMatrix

    x = torch.arange(6.0).unsqueeze(1)
    y = torch.tensor([0, 1, 2, 3, 2, 3])
    predicted = torch.tensor([0, 2, 2, 0, 5, 3])  # class 5 unseen: masked, so that image falls to class 0

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(batch.shape[0], 6)
        out[torch.arange(batch.shape[0]), predicted[batch[:, 0].long()]] = 10.0
        out[:, 0] = 1.0
        return out

    loaders = [DataLoader(TensorDataset(x[:2], y[:2])), DataLoader(TensorDataset(x[2:], y[2:]), batch_size=3)]
    confusion = MulticlassConfusionMatrix(6, validate_args=False)
    counts = evaluate_tasks(logits_fn, loaders, [0, 1, 2, 3], 6, torch.device("cpu"), confusion=confusion)
    assert counts == [(1, 2), (2, 4)]
    confmat = confusion.compute()
    assert confmat.sum() == 6 and confmat[1, 2] == 1 and confmat[3, 0] == 1 and confmat[2, 0] == 1
    assert confmat.diagonal().sum() == 3


def test_error_breakdown_splits_the_wrong_predictions_by_task_and_domain() -> None:
    # Classes 0-1 task 0 (domain a), 2-3 task 1 (a), 4-5 task 2 (b); 20 images.
    confmat = torch.zeros(6, 6, dtype=torch.long)
    confmat[torch.arange(6), torch.arange(6)] = torch.tensor([3, 3, 2, 2, 2, 2])  # 14 right
    confmat[0, 1] = 2  # within its task
    confmat[1, 3] = 1  # another task of domain a
    confmat[4, 0] = 3  # another domain
    class_task = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    errors = error_breakdown(confmat, class_task, ["a", "a", "b"])
    assert errors["images"] == 20 and errors["wrong"] == pytest.approx(30.0)
    assert errors["within_task"] == pytest.approx(10.0) and errors["other_task_same_domain"] == pytest.approx(5.0)
    assert errors["other_domain"] == pytest.approx(15.0) and "other_task" not in errors
    assert errors["to_later_task"] == pytest.approx(5.0) and errors["to_earlier_task"] == pytest.approx(15.0)
    assert sorted(errors["confusions"]) == [[0, 1, 2], [1, 3, 1], [4, 0, 3]]
    plain = error_breakdown(confmat, class_task)  # no domains: every other task's class counts alike
    assert plain["other_task"] == pytest.approx(20.0) and "other_domain" not in plain


def test_evaluate_tasks_refuses_a_head_of_the_wrong_size() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="returns 3 logits but the scenario has 6 classes"):
        evaluate_tasks(lambda b: torch.zeros(b.shape[0], 3), [loader], [0], 6, torch.device("cpu"))


def test_task_accuracy_counts_per_task_and_reports_fractions() -> None:
    from ham_lightning.lightning.evaluation import TaskAccuracy

    metric = TaskAccuracy(num_tasks=3)
    metric.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]), task=0)  # 2 of 3
    metric.update(torch.tensor([4, 4]), torch.tensor([4, 0]), task=2)  # class indices: 1 of 2
    assert metric.counts() == [(2, 3), (0, 0), (1, 2)]
    torch.testing.assert_close(metric.compute(), torch.tensor([2 / 3, 0.0, 0.5]))
    assert set(metric.log_dict("test")) == {"test/acc_task_0", "test/acc_task_2"}  # task 1 has no samples
    assert list(metric.log_dict("val", key="{prefix}/acc/dataloader_idx_{task}")) == [
        "val/acc/dataloader_idx_0", "val/acc/dataloader_idx_2"]
    with pytest.raises(ValueError, match=r"task 3 is outside 0\.\.2"):
        metric.update(torch.tensor([0]), torch.tensor([0]), task=3)
    with pytest.raises(ValueError, match="do not match target"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0]), task=0)
    metric.reset()
    assert metric.counts() == [(0, 0)] * 3


def test_evaluate_tasks_runs_in_the_trainer_precision_context_on_dict_inputs() -> None:
    from toy import quiet_trainer

    calls: list[tuple[bool, torch.dtype]] = []

    def model(x: dict[str, torch.Tensor]) -> torch.Tensor:
        h = x["prefix"]
        calls.append((torch.is_autocast_enabled("cpu"), h.dtype))
        out = torch.nn.functional.linear(h, torch.eye(6, 2))  # autocast makes this bf16
        return out

    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    loader = DataLoader([({"prefix": h[i]}, y[i]) for i in range(3)], batch_size=2)  # default collate: dict of tensors
    trainer = quiet_trainer(precision="bf16-mixed")
    counts = evaluate_tasks(model, [loader], [0, 1], 6, torch.device("cpu"), trainer=trainer)
    assert counts == [(2, 3)]
    assert calls and all(enabled for enabled, _ in calls)
    calls.clear()
    assert evaluate_tasks(model, [loader], [0, 1], 6, torch.device("cpu")) == [(2, 3)]  # no trainer: as is
    assert calls and not any(enabled for enabled, _ in calls)


def test_docstring_examples_hold() -> None:
    import doctest

    from ham_lightning.lightning import evaluation

    result = doctest.testmod(evaluation)
    assert result.attempted > 0 and result.failed == 0

"""benchmarks/error_breakdown.py: a sequential run's own shares, and a one-task run's errors cut by another run's
tasks (digits, 10 classes: the class order is rebuilt from each run's data config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark


def test_a_one_task_run_is_scored_with_another_runs_tasks(tmp_path: Path) -> None:
    script = load_benchmark("error_breakdown")
    data = {"dataset": "digits", "seed": 1993}
    order, sizes, _ = script.scenario({"config": {"data": {**data, "num_tasks": 5}}})
    assert sorted(order) == list(range(10)) and sizes == [2] * 5
    task_of = script.class_tasks(order, sizes)
    assert task_of[order[0]] == task_of[order[1]] == 0 and task_of[order[9]] == 4
    sequential = {"config": {"data": {**data, "num_tasks": 5}}, "accuracy_matrix": [[90.0]] * 5, "method": "ham",
                  "last_accuracy": 80.0, "errors": {"images": 100, "wrong": 20.0, "within_task": 5.0,
                                                    "other_task": 15.0, "confusions": [[0, 1, 5], [9, 0, 10], [2, 8, 5]]}}
    # joint's global classes are the original ones in seed order; two errors inside task 0 of the cut, three across
    joint_order, _, _ = script.scenario({"config": {"data": {**data, "num_tasks": 1}}})
    glob = {c: g for g, c in enumerate(joint_order)}
    confusions = [[glob[order[0]], glob[order[1]], 2], [glob[order[0]], glob[order[9]], 3]]
    joint = {"config": {"data": {**data, "num_tasks": 1}}, "accuracy_matrix": [[95.0]], "method": "joint",
             "last_accuracy": 95.0, "errors": {"images": 100, "wrong": 5.0, "within_task": 5.0, "confusions": confusions}}
    (tmp_path / "ham.json").write_text(json.dumps(sequential))
    (tmp_path / "joint.json").write_text(json.dumps(joint))
    rows = script.breakdown([tmp_path / "ham.json", tmp_path / "joint.json"], [tmp_path / "ham.json"])
    assert [r["method"] for r in rows] == ["ham", "joint"]
    assert rows[0]["within_task"] == 5.0 and rows[0]["other_task"] == 15.0 and rows[0]["tasks"] == 5
    # a sequential run's global classes are in task order: 9 (task 4) -> 0 (task 0) goes to an earlier task
    assert rows[0]["to_earlier_task"] == 10.0 and rows[0]["to_later_task"] == 5.0
    assert rows[1]["wrong"] == pytest.approx(5.0)
    assert rows[1]["within_task"] == pytest.approx(2.0) and rows[1]["other_task"] == pytest.approx(3.0)
    assert rows[1]["to_later_task"] == pytest.approx(3.0) and rows[1]["to_earlier_task"] == 0.0


def test_a_run_that_keeps_its_class_order_needs_no_data() -> None:
    script = load_benchmark("error_breakdown")
    kept = {"config": {"data": {"dataset": "no_such_dataset"}}, "class_order": [2, 0, 1], "task_sizes": [1, 2],
            "task_domains": ["a", "b"]}
    assert script.scenario(kept) == ([2, 0, 1], [1, 2], ["a", "b"])
    assert script.class_tasks([2, 0, 1], [1, 2]) == {2: 0, 0: 1, 1: 1}

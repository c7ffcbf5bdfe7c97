"""The examples run as documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_add_ham_to_existing_project() -> None:
    spec = importlib.util.spec_from_file_location("example", EXAMPLES / "add_ham_to_existing_project.py")
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(epochs_per_task=1)
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert matrix[0][0] > 60  # the first task (2 digits, chance 50%) is learned after one epoch
    assert len(results["groups"]["assignment"]) == 5 and max(results["groups"]["assignment"]) < 2
    assert 0 <= results["last_accuracy"] <= 100

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark


def _run(path: Path, last: float, method: str, tasks: int = 2, groups: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": method, "last_accuracy": last, "average_incremental_accuracy": last + 1,
                                "forgetting": 2.0, "fit_wall_time_s": 10.0, "accuracy_matrix": [[0]] * tasks,
                                "groups": groups}))


def test_table_gives_the_gap_closed_and_the_groups_and_fills_the_marked_block(tmp_path: Path) -> None:
    tables = load_benchmark("tables")
    _run(tmp_path / "T2" / "ridge.json", 50.0, "ridge")
    _run(tmp_path / "T1" / "joint.json", 70.0, "seq_lora", tasks=1, groups={"max_groups": 1, "assignment": [0]})
    _run(tmp_path / "T2" / "ham.json", 65.0, "ham",
         groups={"max_groups": 4, "assignment": [0, 1], "domain_ari": 1.0})
    _run(tmp_path / "T2" / "merge_sum.json", 60.0, "merge_sum", groups={"max_groups": 1, "assignment": [0, 0]})
    text = tables.table(tables.load(tmp_path, 2))
    lines = text.splitlines()
    assert lines[2] == "| ham | 65.00 | 66.00 | 2.00 | 0.75 | 2 used (ARI 1.00) | 10 |"
    assert lines[3].startswith("| merge_sum | 60.00 |") and "| 0.50 | one slot |" in lines[3]
    assert "| ridge | 50.00 | 51.00 | 2.00 | 0.00 | - |" in text
    assert "| joint | 70.00 | 71.00 | 2.00 | 1.00 | - |" in text
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- t-2 -->\nold\n<!-- /t-2 -->\nafter\n")
    tables.fill(doc, "t-2", text)
    assert doc.read_text() == f"before\n<!-- t-2 -->\n{text}\n<!-- /t-2 -->\nafter\n"
    with pytest.raises(SystemExit, match="no <!-- t-3 -->"):
        tables.fill(doc, "t-3", text)
    with pytest.raises(SystemExit, match="no joint result"):
        tables.table({"ridge": {"last_accuracy": 50.0}})

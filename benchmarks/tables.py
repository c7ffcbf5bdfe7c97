"""The docs' comparison tables from `compare.py`'s JSON: last and average incremental accuracy, forgetting, the
gap closed (``(method - ridge) / (joint - ridge)``), the groups used (and their agreement with the task domains),
fit wall time. Prints each table; ``--fill FILE`` also replaces the text between ``<!-- MARKER -->`` and
``<!-- /MARKER -->`` in FILE with it.

    python benchmarks/tables.py --results benchmarks/results/domains_lite0_cpu --num_tasks 10 20 50 \\
        --marker domains-T{T} --fill docs/results.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

ORDER = ("ham", "ham_paper", "seq_lora", "merge_sum", "merge_average", "merge_ties", "first_session", "ridge", "ncm",
         "joint")


def load(results: Path, num_tasks: int) -> dict[str, dict[str, Any]]:
    """Each method's JSON at ``num_tasks`` tasks; ``joint`` from ``T1``."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((results / f"T{num_tasks}").glob("*.json"))}
    joint = results / "T1" / "joint.json"
    if "joint" not in runs and joint.exists():
        runs["joint"] = json.loads(joint.read_text())
    return runs


def groups(run: dict[str, Any]) -> str:
    g = run.get("groups")
    if not g or run.get("method") in ("ridge", "ncm") or len(run.get("accuracy_matrix", [])) == 1:
        return "-"
    if g["max_groups"] == 1:
        return "one slot"
    used = f"{len(set(g['assignment']))} used"
    return f"{used} (ARI {g['domain_ari']:.2f})" if g.get("domain_ari") is not None else used


def table(runs: dict[str, dict[str, Any]]) -> str:
    missing = [m for m in ("ridge", "joint") if m not in runs]
    if missing:
        raise SystemExit(f"no {' or '.join(missing)} result: the gap closed needs both anchors; run compare.py "
                         f"--methods {' '.join(missing)} with the same --out first")
    ridge, joint = runs["ridge"]["last_accuracy"], runs["joint"]["last_accuracy"]
    rows = ["| method | last acc | avg inc acc | forgetting | gap closed | groups (ARI vs domains) | fit wall (s) |",
            "|:---|---:|---:|---:|---:|:---|---:|"]
    for method in [m for m in ORDER if m in runs] + sorted(set(runs) - set(ORDER)):
        r = runs[method]
        gap = (r["last_accuracy"] - ridge) / (joint - ridge)
        rows.append(f"| {method} | {r['last_accuracy']:.2f} | {r['average_incremental_accuracy']:.2f} | "
                    f"{r['forgetting']:.2f} | {gap:.2f} | {groups(r)} | {r['fit_wall_time_s']:.0f} |")
    return "\n".join(rows)


def fill(path: Path, marker: str, text: str) -> None:
    """Replace what lies between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``path``."""
    source = path.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->\n).*?(\n<!-- /{re.escape(marker)} -->)", re.S)
    if not pattern.search(source):
        raise SystemExit(f"{path}: no <!-- {marker} --> ... <!-- /{marker} --> block; add the two markers first")
    path.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), source))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="compare.py's --out")
    parser.add_argument("--num_tasks", type=int, nargs="+", default=[10])
    parser.add_argument("--marker", default=None, help="block name in --fill files, {T} the task count")
    parser.add_argument("--fill", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    for num_tasks in args.num_tasks:
        text = table(load(args.results, num_tasks))
        print(f"## {num_tasks} tasks\n\n{text}\n")
        for path in args.fill:
            fill(path, args.marker.format(T=num_tasks), text)


if __name__ == "__main__":
    main()

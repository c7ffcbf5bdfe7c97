"""Where each run's wrong predictions went: within the image's task, another task of its domain, another domain.

Reads runs' results (``results.json`` or the JSONs `compare.py` / `ablate.py` write), whose ``errors`` hold the
last evaluation's confusions. A one-task run (``joint``) has no tasks to tell apart, so it is also scored with the
tasks of each run given to ``--partitions`` (the same classes cut into that run's tasks): how many of its errors
fall between classes the sequential runs learned in different tasks. Prints a Markdown table; ``--out`` writes it
as JSON too. Runs whose results lack `class_order` (written before it was kept) rebuild it from their data
config, so the data sets must then be where those configs say.

    python benchmarks/error_breakdown.py benchmarks/results/domains_lite0_cpu/errors_T10/*.json \\
        benchmarks/results/domains_lite0_cpu/errors_T50/*.json \\
        --partitions benchmarks/results/domains_lite0_cpu/errors_T10/default.json \\
        benchmarks/results/domains_lite0_cpu/errors_T50/default.json \\
        --out benchmarks/results/domains_lite0_cpu/error_breakdown.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ham_lightning.lightning.evaluation import error_shares
from ham_lightning.report import markdown_table

KEYS = ("wrong", "within_task", "other_task", "other_task_same_domain", "other_domain",  # other_task: no domains
        "to_later_task", "to_earlier_task")


def scenario(results: dict[str, Any]) -> tuple[list[int], list[int], list[str] | None]:
    """The run's class order (original class of each global class), task sizes and task domains: from its
    results where they are kept, else rebuilt from its data config (runs written before results.json kept them)."""
    if "class_order" in results and "task_sizes" in results:
        return list(results["class_order"]), list(results["task_sizes"]), results.get("task_domains")
    from ham_lightning.data.datamodule import ClassIncrementalDataModule

    dm = ClassIncrementalDataModule(**results["config"]["data"])
    return [int(c) for c in dm.class_order], list(dm.task_sizes), dm.task_domains


def class_tasks(order: Sequence[int], sizes: Sequence[int]) -> dict[int, int]:
    """Original class -> task, from a class order and task sizes."""
    tasks = [t for t, n in enumerate(sizes) for _ in range(n)]
    return {c: tasks[g] for g, c in enumerate(order)}


def breakdown(paths: Sequence[Path], partitions: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per run with errors, plus one per partition for each one-task run."""
    cuts = []
    for path in partitions:
        order, sizes, domains = scenario(json.loads(path.read_text()))
        cuts.append((path, class_tasks(order, sizes), domains, len(sizes)))
    rows = []
    for path in paths:
        results = json.loads(path.read_text())
        errors = results.get("errors")
        if not errors:
            continue
        name = f"{path.parent.name}/{path.stem}"
        base = {"run": name, "method": results.get("method"), "last_accuracy": results["last_accuracy"]}
        order, sizes, domains = scenario(results)  # global class of this run -> original class
        if len(sizes) > 1:  # shares from the confusions, so runs written before a key existed get it too
            class_task = class_tasks(range(len(order)), sizes)
            shares = error_shares(errors["confusions"], errors["images"], class_task, domains)
            rows.append({**base, "tasks": len(sizes), **shares})
            continue
        for cut, original_task, domains, num_tasks in cuts:
            class_task = {g: original_task[c] for g, c in enumerate(order)}
            shares = error_shares(errors["confusions"], errors["images"], class_task, domains)
            rows.append({**base, "tasks": f"1, cut as {cut.parent.name}/{cut.stem} ({num_tasks})", **shares})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--partitions", nargs="*", type=Path, default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = breakdown(args.runs, args.partitions)
    print("\n".join(markdown_table(
        ["run", "tasks", "last acc", "wrong", "within task", "other task", "other task, same domain", "other domain",
         "to a later task", "to an earlier task"],
        [[r["run"], r["tasks"], f"{r['last_accuracy']:.2f}", *(f"{r[k]:.2f}" if r.get(k) is not None else "-"
                                                               for k in KEYS)] for r in rows])))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()

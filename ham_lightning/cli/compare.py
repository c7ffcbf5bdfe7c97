"""``ham-lightning compare``: a table and a plot from finished runs' ``results.json`` (nothing is re-run)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def compare_main(argv: Sequence[str]) -> dict[str, Any]:
    """``ham-lightning compare runs/* [--out <folder>]``: table and plot from finished runs' ``results.json``."""
    import argparse

    from ham_lightning.lightning.results import compare_runs

    parser = argparse.ArgumentParser(
        prog="ham-lightning compare",
        description="A table and a plot from finished runs' results.json (nothing is re-run). Unfinished runs "
                    "(a checkpoint but no results.json yet) are skipped and named; other folders (test / predict "
                    "outputs, earlier comparisons) are skipped and named as not fit runs.")
    parser.add_argument("runs", nargs="+", help="Run folders (or their results.json), e.g. runs/*.")
    parser.add_argument("--out", default=None,
                        help="Where compare.md, compare.json and compare.png go (default: <the runs' folder>/"
                             "comparison, e.g. runs/comparison).")
    ns = parser.parse_args(list(argv))
    out = Path(ns.out) if ns.out else default_out(ns.runs)
    finished, unfinished, other = [], [], []
    for p in ns.runs:
        path = Path(p)
        if (path / "results.json").is_file() or (path.is_file() and path.name == "results.json"):
            finished.append(p)
        elif path.resolve() == out.resolve():
            continue  # the output of an earlier compare into the same folder
        elif (path / "checkpoints").is_dir():
            unfinished.append(p)
        else:
            other.append(p)
    if unfinished:
        print(f"skipped, unfinished (no results.json yet): {', '.join(unfinished)}", file=sys.stderr)
    if other:
        print(f"skipped, not fit runs: {', '.join(other)}", file=sys.stderr)
    if not finished:
        parser.error("none of the given folders holds a finished run's results.json.")
    result = compare_runs(finished, out)
    print(result["table"])
    for key, path in result["files"].items():
        print(f"{key}: {path}")
    return result


def default_out(runs: Sequence[str]) -> Path:
    """``<folder holding the runs>/comparison`` (``runs/comparison`` for ``runs/*``), never the working tree's
    top level unless the runs are there."""
    parents = {Path(p).resolve().parent if not Path(p).is_file() else Path(p).resolve().parent.parent for p in runs}
    common = Path(os.path.commonpath([str(p) for p in parents])) if parents else Path("runs")
    return common / "comparison"

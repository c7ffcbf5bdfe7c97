"""``ham-lightning compare``: a table and a plot from finished runs' ``results.json`` (nothing is re-run)."""

from __future__ import annotations

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
        description="A table and a plot from finished runs' results.json (nothing is re-run). Folders without "
                    "results.json (unfinished runs) are skipped and named.")
    parser.add_argument("runs", nargs="+", help="Run folders (or their results.json), e.g. runs/*.")
    parser.add_argument("--out", default="comparison", help="Where compare.md, compare.json and compare.png go.")
    ns = parser.parse_args(list(argv))
    finished = [p for p in ns.runs if Path(p, "results.json").is_file() or
                (Path(p).is_file() and Path(p).name == "results.json")]
    skipped = [p for p in ns.runs if p not in finished]
    if skipped:
        print(f"skipped (no results.json): {', '.join(skipped)}", file=sys.stderr)
    if not finished:
        parser.error("none of the given folders holds a finished run's results.json.")
    result = compare_runs(finished, ns.out)
    print(result["table"])
    for key, path in result["files"].items():
        print(f"{key}: {path}")
    return result

"""Run report: figures and a Markdown summary of one continual-learning run's ``results.json``.

Pure matplotlib (object-oriented `Figure` API on the Agg canvas, no pyplot, no Lightning): importing this module
never changes the user's backend, figures are not registered with pyplot so none pile up, and it works headless.

* `figures` builds the plots (accuracy matrix, accuracy over tasks, HAM group assignment when present);
* `write_report` saves them as PNGs next to a ``report.md`` and returns the paths;
* `summary_lines` is the few lines a CLI prints at the end of a run.

Tasks are numbered from 1 wherever a person reads them (ticks, legends, tables), as the CLI's task lines do;
``results.json`` keeps 0-based indices (``assignment[i]`` is task ``i + 1``'s group slot). Colour scales are
fitted to the values shown, and every value is also written in its cell up to `MAX_ANNOTATED_TASKS` tasks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ham_lightning.report_figures import (
    DPI,
    MAX_ANNOTATED_TASKS,
    Results,
    _accuracy_matrix_figure,
    _accuracy_over_tasks_figure,
    _count,
    _domains_figure,
    _duration,
    _groups_figure,
    _matrix,
    _max_or_none,
    _mb,
    _num,
    _pct,
    _pp,
    _run_title,
    _seen_accuracy,
    _total_time,
    domain_group_counts,
)

__all__ = ["DPI", "MAX_ANNOTATED_TASKS", "domain_group_counts", "figures", "markdown_table", "summary_lines", "wall_time",
           "write_report"]

# ---------------------------------------------------------------------------------------------------- public API


def figures(results: Results) -> dict[str, Figure]:
    """Figures of a run: ``accuracy_matrix``, ``accuracy_over_tasks`` and, for HAM runs (``results["groups"]``),
    ``groups``. They are plain `Figure` objects (not pyplot-managed): save with ``fig.savefig``."""
    out = {
        "accuracy_matrix": _accuracy_matrix_figure(results),
        "accuracy_over_tasks": _accuracy_over_tasks_figure(results),
    }
    if results.get("groups"):
        out["groups"] = _groups_figure(results)
        if results.get("task_domains"):
            out["domains_groups"] = _domains_figure(results)
    return out


def write_report(results: Results, run_dir: str | Path) -> dict[str, Path]:
    """Save the figures as ``<key>.png`` and a ``report.md`` linking them into ``run_dir`` (created if needed).

    Returns the written paths by key: the figure keys of `figures` plus ``report``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, fig in figures(results).items():
        path = run_dir / f"{key}.png"
        fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
        fig.clear()  # release the artists now: a 50-task report holds thousands of them
        paths[key] = path
    report = run_dir / "report.md"
    report.write_text(_markdown(results, {k: p.name for k, p in paths.items()}), encoding="utf-8")
    paths["report"] = report
    return paths


def summary_lines(results: Results) -> list[str]:
    """A short human summary (last / average incremental accuracy, forgetting, BWT, groups) for a CLI's last words."""
    matrix = _matrix(results)
    title = " ".join(str(x) for x in (results.get("method"), results.get("name") and f"'{results['name']}'") if x)
    lines = [f"{title + ': ' if title else ''}{len(matrix)} task{'s' if len(matrix) != 1 else ''}"]
    lines.append(
        f"last accuracy {_pct(results.get('last_accuracy'))} | "
        f"average incremental accuracy {_pct(results.get('average_incremental_accuracy'))}"
    )
    lines.append(f"forgetting {_pp(results.get('forgetting'))} | BWT {_pp(results.get('bwt'), signed=True)}")
    groups = results.get("groups")
    if groups:
        assignment = list(groups.get("assignment") or [])
        used = len(set(assignment))
        shown = " ".join(str(g) for g in assignment[:MAX_ANNOTATED_TASKS])
        more = " ..." if len(assignment) > MAX_ANNOTATED_TASKS else ""
        lines.append(f"groups used {used} of {groups.get('max_groups', '?')} (task -> group: {shown}{more})")
        if groups.get("domain_ari") is not None:
            lines.append(f"groups against the task domains: adjusted Rand index {groups['domain_ari']:.2f}")
    tasks = results.get("tasks") or []
    total = wall_time(results)
    peak = _max_or_none(t.get("peak_memory_mb") for t in tasks)
    if total is not None or peak is not None:
        lines.append(f"wall time {_duration(total)} | peak memory {_mb(peak)}")
    return lines


def wall_time(results: Results) -> float | None:
    """The run's wall time, one definition for the summary, the report and ``compare``: the whole fit
    (``fit_wall_time_s``: training, boundaries, evaluation; every process of a resumed run added up), else the
    sum of the tasks' times (results written by the Python API without it)."""
    fit = results.get("fit_wall_time_s")
    return float(fit) if fit is not None else _total_time(results.get("tasks") or [])


def _errors_text(errors: Mapping[str, object]) -> str:
    """`error_breakdown`'s shares in words: wrong in all, then where the wrong predictions went."""
    names = {"within_task": "within the image's task", "other_task": "another task",
             "other_task_same_domain": "another task of its domain", "other_domain": "another domain",
             "to_later_task": "a later task", "to_earlier_task": "an earlier task"}
    parts = [f"{_num(errors[key])} {name}" for key, name in names.items() if key in errors]
    return f"{_num(errors.get('wrong'))} wrong: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- markdown


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """The lines of a Markdown table (the project's one writer: reports, comparisons, benchmarks).

    ``align`` is one char per column (l/r/c), default left first then right; cells are written with ``str``.
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"a table of {len(header)} columns needs {len(header)} alignments and cells per row")
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _markdown(results: Results, images: Mapping[str, str]) -> str:
    """The report text; ``images`` maps figure keys to file names relative to report.md."""
    matrix = _matrix(results)
    tasks = list(results.get("tasks") or [])
    groups = results.get("groups") or None
    title = _run_title(results)
    md: list[str] = [f"# Continual-learning report{': ' + title if title else ''}", ""]

    summary: list[tuple[str, str]] = [
        ("Tasks", str(len(matrix))),
        ("Last accuracy", _pct(results.get("last_accuracy"))),
        ("Average incremental accuracy", _pct(results.get("average_incremental_accuracy"))),
        ("Forgetting", _pp(results.get("forgetting"))),
        ("BWT", _pp(results.get("bwt"), signed=True)),
    ]
    if groups:
        assignment = groups.get("assignment") or []
        summary.append(("Groups used", f"{len(set(assignment))} of {groups.get('max_groups', '?')}"))
    if results.get("errors"):
        summary.append(("Errors (% of the last evaluation's images)", _errors_text(results["errors"])))
    if wall_time(results) is not None:
        summary.append(("Total wall time", _duration(wall_time(results))))
    peak = _max_or_none(t.get("peak_memory_mb") for t in tasks)
    if peak is not None:
        summary.append(("Peak memory", _mb(peak)))
    md += ["## Summary", "", *markdown_table(["Metric", "Value"], summary), ""]

    captions = {
        "accuracy_matrix": "Accuracy matrix",
        "accuracy_over_tasks": "Accuracy over tasks",
        "groups": "Group assignment and similarities",
        "domains_groups": "Group slots of each domain's tasks",
    }
    if images:
        md += ["## Figures", ""]
        for key, name in images.items():
            md += [f"![{captions.get(key, key)}]({name})", ""]

    if matrix:
        n = len(matrix)
        md += ["## Accuracy matrix (%)", "",
               "Row i: after training task i; column j: accuracy on task j's test set; last column: all seen "
               "classes. Tasks are numbered from 1.", ""]
        seen = _seen_accuracy(results)
        header = ["after task", *[str(j + 1) for j in range(n)], "seen"]
        rows = [[i + 1, *[_num(v) if v is not None else "" for v in row], _num(seen[i]) if i < len(seen) else "–"]
                for i, row in enumerate(matrix)]
        md += [*markdown_table(header, rows), ""]

    if tasks:
        md += ["## Per task", ""]
        rows = [[int(t.get("task", i)) + 1, _num(t.get("accuracy_seen")), _duration(t.get("wall_time_s")),
                 _mb(t.get("peak_memory_mb"))] for i, t in enumerate(tasks)]
        md += [*markdown_table(["Task", "Accuracy on seen classes (%)", "Wall time", "Peak memory"], rows), ""]

    if groups:
        md += _groups_markdown(groups)

    params = results.get("params")
    if params:
        md += ["## Parameters", "", *markdown_table(["Parameters", "Count"], [[k, _count(v)] for k, v in params.items()]),
               ""]

    config = results.get("config")
    if config:
        md += ["## Config", "", "<details><summary>resolved config</summary>", "", "```json",
               json.dumps(config, indent=2, sort_keys=True, default=str), "```", "", "</details>", ""]
    return "\n".join(md)


def _groups_markdown(groups: Mapping[str, Any]) -> list[str]:
    """The group-assignment table: one row per task."""
    assignment = list(groups.get("assignment") or [])

    def at(key: str, i: int) -> Any:
        values = groups.get(key) or []
        return values[i] if i < len(values) else None

    rows: list[list[Any]] = []
    for i, g in enumerate(assignment):
        sims = at("similarities", i) or []
        occupied = [(s, k) for k, s in enumerate(sims) if s is not None]
        best = f"{max(occupied)[0]:.3f} (slot {max(occupied)[1]})" if occupied else "–"
        joined = sims[g] if g < len(sims) and sims[g] is not None else None
        opened = at("opened", i)
        ranks = at("group_ranks", i)
        rows.append([
            i + 1, g, "yes" if opened else ("no" if opened is not None else "–"),
            _num(joined, 3), best, _num(at("importance", i), 3), _num(at("kept_fraction", i), 3),
            ", ".join(str(r) for r in ranks) if ranks else "–",
        ])
    header = ["Task", "Group", "Opened", "Similarity to joined group", "Best similarity (slot)", "Importance",
              "Kept fraction", "Group ranks after merge"]
    return ["## Groups", "", f"Maximum groups: {groups.get('max_groups', '?')}; groups used: "
            f"{len(set(assignment))}. Similarities are cosines with each occupied slot before the merge.", "",
            *markdown_table(header, rows), ""]

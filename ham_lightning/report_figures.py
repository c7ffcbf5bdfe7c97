"""The plots of a run report (`ham_lightning.report`): accuracy matrix, accuracy over tasks, HAM's groups and, for
a mixed-domain run, which group each domain's tasks joined; with the helpers that read ``results.json`` and format
its numbers. Pure matplotlib (object-oriented `Figure` API, no pyplot, no Lightning)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

#: Resolution of the saved PNGs.
DPI = 120
#: Above this many tasks the heat maps drop their per-cell numbers (they would be unreadable).
MAX_ANNOTATED_TASKS = 20

_ACC_CMAP = "viridis"
_SIM_CMAP = "RdBu_r"
_MISSING_COLOR = "#eeeeee"

Results = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------------- data access


def _matrix(results: Results) -> list[list[float | None]]:
    """The accuracy matrix as square list of lists (ragged rows padded with None)."""
    rows = [list(r) for r in (results.get("accuracy_matrix") or [])]
    size = max([len(rows)] + [len(r) for r in rows])
    return [r + [None] * (size - len(r)) for r in rows]


def _as_array(rows: Sequence[Sequence[float | None]], width: int | None = None) -> np.ndarray:
    """Rows with None (or missing) entries as a float array with NaN, padded to ``width`` columns."""
    width = width if width is not None else max([0] + [len(r) for r in rows])
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        for j, v in enumerate(list(row)[:width]):
            if v is not None:
                out[i, j] = float(v)
    return out


def _seen_accuracy(results: Results) -> list[float]:
    """Accuracy on all classes seen so far after each task: ``incremental_accuracy``, else the tasks' records."""
    inc = results.get("incremental_accuracy")
    if inc:
        return [float(v) for v in inc]
    return [float(t["accuracy_seen"]) for t in results.get("tasks") or [] if t.get("accuracy_seen") is not None]


def _max_or_none(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return max(vals) if vals else None


def _total_time(tasks: Sequence[Mapping[str, Any]]) -> float | None:
    vals = [float(t["wall_time_s"]) for t in tasks if t.get("wall_time_s") is not None]
    return sum(vals) if vals else None


# ---------------------------------------------------------------------------------------------------- formatting


def _num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{float(v):.{digits}f}"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{_num(v)}%"


def _pp(v: Any, signed: bool = False) -> str:
    """Percentage points (forgetting, BWT are differences of accuracies)."""
    if v is None:
        return "–"
    return f"{float(v):+.2f} pp" if signed else f"{float(v):.2f} pp"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _mb(v: float | None) -> str:
    return "–" if v is None else f"{float(v):,.1f} MB"


def _count(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _run_title(results: Results) -> str:
    parts = [str(results[k]) for k in ("name", "method") if results.get(k)]
    if len(parts) == 2 and parts[0] != parts[1]:
        return f"{parts[0]} ({parts[1]})"
    return parts[0] if parts else ""


# ---------------------------------------------------------------------------------------------------- plotting helpers


def _new_figure(width: float, height: float, ncols: int = 1, **gridspec: Any) -> tuple[Figure, list[Axes]]:
    """A pyplot-free figure on the Agg canvas with ``ncols`` axes and constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False, gridspec_kw=gridspec or None)[0]
    return fig, list(axes)


def _cmap(name: str) -> Colormap:
    return matplotlib.colormaps[name].with_extremes(bad=_MISSING_COLOR)


def _task_ticks(ax: Axes, n: int, axis: str) -> None:
    """Integer task ticks numbered from 1 (data position ``i`` is task ``i + 1``): every task up to
    MAX_ANNOTATED_TASKS, else a few round numbers."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    if n <= MAX_ANNOTATED_TASKS:
        target.set_ticks(range(n))
    else:
        target.set_major_locator(MaxNLocator(nbins=10, integer=True))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v)) + 1}"))


def _fitted_range(values: np.ndarray, floor: float | None = None, ceiling: float | None = None,
                  pad: float = 0.05, least: float = 1.0) -> tuple[float, float]:
    """Limits that fit the finite ``values`` with ``pad`` of their span on each side (at least ``least`` wide),
    clipped to ``[floor, ceiling]``: differences of a point or two stay visible."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (floor if floor is not None else 0.0), (ceiling if ceiling is not None else 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    margin = max(pad * (hi - lo), (least - (hi - lo)) / 2, 0.0)
    lo, hi = lo - margin, hi + margin
    return (max(lo, floor) if floor is not None else lo), (min(hi, ceiling) if ceiling is not None else hi)


def _cell_format(v: float, scale: float) -> str:
    """A cell's number: 2 decimals, or 2 significant digits when every value is below 0.05 (similarities of
    near-orthogonal adapters); never ``-0.00``."""
    text = format(v, ".2f") if scale >= 0.05 else format(v, ".1e")
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _annotate(ax: Axes, data: np.ndarray, cmap: Colormap, vmin: float, vmax: float, fmt: str, size: float) -> None:
    """Write each finite cell's value, dark or light depending on the cell colour (``fmt="cell"``: `_cell_format`
    on the largest magnitude)."""
    finite = data[np.isfinite(data)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    for (i, j), v in np.ndenumerate(data):
        if not np.isfinite(v):
            continue
        r, g, b, _ = cmap(min(max((v - vmin) / (vmax - vmin), 0.0), 1.0) if vmax > vmin else 0.5)
        light = 0.299 * r + 0.587 * g + 0.114 * b > 0.55
        text = _cell_format(v, scale) if fmt == "cell" else format(v, fmt)
        ax.text(j, i, text, ha="center", va="center", fontsize=size, color="black" if light else "white")


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _suptitle(fig: Figure, results: Results, what: str) -> None:
    title = _run_title(results)
    fig.suptitle(f"{what} — {title}" if title else what, fontsize=12, fontweight="bold")


# ---------------------------------------------------------------------------------------------------- figures


def _accuracy_matrix_figure(results: Results) -> Figure:
    """Heat map of A[i][j] (row: after task i, column: task j), numbers in the cells up to 20 tasks."""
    data = _as_array(_matrix(results))
    n = data.shape[0]
    side = min(max(4.5, 0.5 * n + 2.0), 11.0)
    fig, (ax,) = _new_figure(side + 1.2, side)
    _suptitle(fig, results, "Accuracy matrix")
    if n == 0:
        _empty(ax, "no task evaluated")
        return fig
    cmap = _cmap(_ACC_CMAP)
    vmin, vmax = _fitted_range(data, 0.0, 100.0, pad=0.0)
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="equal")
    if n <= MAX_ANNOTATED_TASKS:
        _annotate(ax, data, cmap, vmin, vmax, ".1f", size=max(5.0, 10.0 - 0.25 * n))
    _task_ticks(ax, n, "x")
    _task_ticks(ax, n, "y")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(
        f"last {_pct(results.get('last_accuracy'))} · avg incremental "
        f"{_pct(results.get('average_incremental_accuracy'))} · forgetting {_pp(results.get('forgetting'))} · "
        f"BWT {_pp(results.get('bwt'), signed=True)}",
        fontsize=9, color="dimgray",
    )
    fig.colorbar(image, ax=ax, shrink=0.8, label="accuracy (%)")
    return fig


def _accuracy_over_tasks_figure(results: Results) -> Figure:
    """Left: accuracy on the seen classes after each task, with each task's own curve. Right: each task's accuracy
    just after it was learned vs at the end (the gap is its forgetting)."""
    data = _as_array(_matrix(results))
    seen = _seen_accuracy(results)
    n = max(data.shape[0], len(seen))
    fig, (left, right) = _new_figure(12.0, 4.6, ncols=2, width_ratios=[1.25, 1.0])
    _suptitle(fig, results, "Accuracy over tasks")
    if n == 0:
        _empty(left, "no task evaluated")
        _empty(right, "no task evaluated")
        return fig

    steps = np.arange(n)
    # Distinct colours a reader can tell apart, one legend entry per task while they fit; else one entry.
    distinct = n <= 10
    cmap = matplotlib.colormaps["tab10" if distinct else "turbo"]
    handles: list[Line2D] = []
    marker = "o" if n <= 30 else "."  # every line has markers: a task learned last is a single point
    for j in range(data.shape[1]):
        col = data[j:, j]
        if np.isfinite(col).any():
            color = cmap(j) if distinct else cmap(0.1 + 0.8 * j / max(1, n - 1))
            (task_line,) = left.plot(steps[j:j + len(col)], col, color=color, lw=1.4 if distinct else 1.0,
                                     marker=marker, ms=3.5 if distinct else 2.0,
                                     alpha=0.85 if distinct else 0.4, zorder=1, label=f"task {j + 1}")
            if distinct:
                handles.append(task_line)
    if not distinct:
        handles.append(Line2D([], [], color=cmap(0.5), lw=1.0, alpha=0.6, marker=".",
                              label=f"tasks 1-{n} (blue: first, red: last), from when learned"))
    if seen:
        (line,) = left.plot(steps[: len(seen)], seen, color="black", lw=2.4, marker=marker,
                            ms=5 if n <= 30 else 3, label="all seen classes", zorder=3)
        handles.insert(0, line)
        avg = results.get("average_incremental_accuracy")
        if avg is not None:
            handles.append(left.axhline(float(avg), color="black", ls="--", lw=1.0, alpha=0.6,
                                        label=f"average incremental ({float(avg):.1f}%)"))
        left.annotate(f"{seen[-1]:.1f}%", (len(seen) - 1, seen[-1]), xytext=(6, 6), textcoords="offset points",
                      fontsize=9, fontweight="bold")
    shown = np.concatenate([data.ravel(), np.asarray(seen, dtype=float)])
    low, high = _fitted_range(shown, 0.0, 100.0, pad=0.08, least=5.0)
    left.set_xlim(-0.5, n - 0.5)
    left.set_ylim(low, high + 0.12 * (high - low))  # headroom for the last value's label
    _task_ticks(left, n, "x")
    left.set_xlabel("after training task")
    left.set_ylabel("accuracy (%)")
    left.set_title("accuracy on seen classes", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(handles=handles, loc="best", fontsize=8, framealpha=0.9)

    # Each task's accuracy just after it was learned and at the end, joined: the drop is its forgetting. Points
    # on an axis fitted to them (bars would have to start at 0 and hide a point's difference).
    diag = np.array([data[j, j] if j < data.shape[0] else np.nan for j in range(data.shape[1])])
    final = data[-1, :] if data.size else np.array([])
    tasks = np.arange(len(diag))
    right.vlines(tasks, np.fmin(diag, final), np.fmax(diag, final), color="gray", lw=1.2, zorder=1)
    right.plot(tasks, diag, ls="", marker="o", ms=6, color="#4c72b0", label="just after learning it", zorder=2)
    right.plot(tasks, final, ls="", marker="s", ms=5, color="#dd8452", label="after the last task", zorder=3)
    low, high = _fitted_range(np.concatenate([diag, final]), 0.0, 100.0, pad=0.1, least=5.0)
    right.set_xlim(-0.7, max(len(diag), 1) - 0.3)
    right.set_ylim(low, high + 0.15 * (high - low))  # headroom for the legend
    _task_ticks(right, len(diag), "x")
    right.set_xlabel("task")
    right.set_ylabel("accuracy on the task (%)")
    right.set_title(f"per-task accuracy (forgetting {_pp(results.get('forgetting'))})", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    right.legend(loc="upper center", ncols=2, fontsize=8, framealpha=0.9)
    return fig


def _groups_figure(results: Results) -> Figure:
    """Left: which task joined which group slot (stars: the task opened it). Right: the task-vs-slot cosine
    similarities before each merge, the joined slot boxed."""
    groups: Mapping[str, Any] = results["groups"]
    assignment = [int(g) for g in groups.get("assignment") or []]
    opened = [bool(o) for o in groups.get("opened") or []] + [False] * len(assignment)
    sims_rows = groups.get("similarities") or []
    slots = max([int(groups.get("max_groups") or 0), max(assignment, default=-1) + 1]
                + [len(r) for r in sims_rows])
    n = max(len(assignment), len(sims_rows))
    height = min(max(4.0, 0.2 * n + 2.5), 10.0)
    fig, (left, right) = _new_figure(12.0, height, ncols=2, width_ratios=[1.0, 1.0])
    used = len(set(assignment))
    _suptitle(fig, results, f"HAM groups ({used} of {slots} slots used)")
    if n == 0 or slots == 0:
        _empty(left, "no assignment recorded")
        _empty(right, "no similarity recorded")
        return fig

    colors = matplotlib.colormaps["tab10" if slots <= 10 else "tab20"]
    tasks = np.arange(len(assignment))
    for g in sorted(set(assignment)):
        idx = tasks[np.array(assignment) == g]
        left.plot(idx, [g] * len(idx), color=colors(g % colors.N), lw=1.0, alpha=0.35, zorder=1)
    marker_size = 70 if n <= MAX_ANNOTATED_TASKS else 30
    for t, g in enumerate(assignment):
        left.scatter(t, g, s=marker_size * (2.2 if opened[t] else 1.0), marker="*" if opened[t] else "o",
                     color=colors(g % colors.N), edgecolors="black", linewidths=0.6, zorder=3)
    left.set_ylim(slots - 0.5, -0.5)
    left.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(slots, 20)))
    left.set_xlim(-0.7, max(len(assignment), 1) - 0.3)
    _task_ticks(left, len(assignment), "x")
    left.set_xlabel("task")
    left.set_ylabel("group slot")
    left.set_title("task → group", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(
        handles=[
            Line2D([], [], ls="", marker="*", ms=11, color="lightgray", mec="black", label="opened the group"),
            Line2D([], [], ls="", marker="o", ms=7, color="lightgray", mec="black", label="merged into it"),
        ],
        loc="best", fontsize=8, framealpha=0.9,
    )

    sims = _as_array(sims_rows, width=slots)
    finite = sims[np.isfinite(sims)]
    # Fitted to the values: cosines of near-orthogonal adapters are ~1e-3, white on a fixed [-1, 1] scale.
    # Diverging and centred on 0 when any is negative, sequential from 0 otherwise.
    reach = float(np.abs(finite).max()) if finite.size else 1.0
    reach = reach if reach > 0 else 1.0
    vmin, vmax = (-reach, reach) if finite.size and finite.min() < 0 else (0.0, reach)
    cmap = _cmap(_SIM_CMAP if vmin < 0 else "Blues")
    image = right.imshow(sims, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
    if n <= MAX_ANNOTATED_TASKS and slots <= 12:
        _annotate(right, sims, cmap, vmin, vmax, "cell", size=max(5.0, 9.0 - 0.15 * n))
    for t, g in enumerate(assignment[: sims.shape[0]]):  # inset boxes: neighbouring boxes stay apart
        right.add_patch(Rectangle((g - 0.42, t - 0.42), 0.84, 0.84, fill=False, lw=1.6,
                                  ec="black" if not opened[t] else "#c44e52"))
    _task_ticks(right, sims.shape[0], "y")
    right.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(slots, 20)))
    right.set_xlabel("group slot")
    right.set_ylabel("task")
    right.set_title("cosine similarity with each slot before the merge\n(box: joined slot, red: opened "
                    "(empty before); grey: empty slot)", fontsize=10)
    fig.colorbar(image, ax=right, shrink=0.85, label="cosine similarity")
    return fig


def domain_group_counts(domains: Sequence[str], assignment: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """The domains in first-seen order and a ``domains x slots`` count of which slot each domain's tasks joined."""
    names = list(dict.fromkeys(domains))
    slots = max(assignment, default=-1) + 1
    counts = np.zeros((len(names), max(slots, 1)), dtype=np.int64)
    for d, g in zip(domains, assignment):
        counts[names.index(d), int(g)] += 1
    return names, counts


def _domains_figure(results: Results) -> Figure:
    """A mixed-domain run: how many of each domain's tasks went to each group slot (one row per domain; a
    hierarchy that follows the domains puts each row's tasks in one column)."""
    groups: Mapping[str, Any] = results["groups"]
    assignment = [int(g) for g in groups.get("assignment") or []]
    domains = list(results.get("task_domains") or [])[: len(assignment)]
    names, counts = domain_group_counts(domains, assignment[: len(domains)])
    slots = max(int(groups.get("max_groups") or 0), counts.shape[1])
    counts = np.pad(counts, ((0, 0), (0, slots - counts.shape[1])))
    fig, (ax,) = _new_figure(max(4.5, 0.7 * slots + 3.0), max(2.8, 0.5 * len(names) + 1.8))
    _suptitle(fig, results, "Which group each domain's tasks joined")
    cmap = _cmap("Blues")
    vmax = max(int(counts.max()), 1)
    ax.imshow(counts, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest", aspect="auto")
    _annotate(ax, counts.astype(float), cmap, 0.0, float(vmax), ".0f", size=10.0)
    ax.set_xticks(range(slots))
    ax.set_yticks(range(len(names)), labels=[f"{n} ({int(c.sum())} tasks)" for n, c in zip(names, counts)])
    ax.set_xlabel("group slot")
    ax.set_title("tasks per (domain, group)", fontsize=10)
    return fig

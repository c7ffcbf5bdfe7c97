"""Run report: figures, PNG files and report.md from a results.json-shaped dict."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from PIL import Image

import ham_lightning.report as report
from ham_lightning.lightning.evaluation import continual_metrics
from ham_lightning.report import figures, summary_lines, write_report

PNG_KEYS = {"accuracy_matrix", "accuracy_over_tasks", "groups"}


def make_results(num_tasks: int, max_groups: int = 3, groups: bool = True) -> dict[str, Any]:
    """A deterministic results dict as written to results.json (through JSON: lists, None, plain numbers)."""
    rows = [[(90 - 4 * (i - j) - (j % 3), 100) for j in range(i + 1)] for i in range(num_tasks)]
    results: dict[str, Any] = dict(continual_metrics(rows))
    results["tasks"] = [
        {"task": i, "wall_time_s": 30.0 + 15 * i, "peak_memory_mb": 1500.0 + 10 * i,
         "accuracy_seen": results["incremental_accuracy"][i]}
        for i in range(num_tasks)
    ]
    results["params"] = {"trainable": 1234567, "stored_adapter": 98765}
    results["config"] = {"data": {"name": "cifar100"}, "seed": 1993}
    results["name"] = f"synthetic-{num_tasks}"
    if groups:
        assignment = [min(i, max_groups - 1) if i < max_groups else i % max_groups for i in range(num_tasks)]
        opened = [i < max_groups for i in range(num_tasks)]
        similarities = [
            [round(0.1 + 0.8 * ((i + k) % 5) / 4, 3) if k < min(i, max_groups) else None for k in range(max_groups)]
            for i in range(num_tasks)
        ]
        results["groups"] = {
            "max_groups": max_groups, "assignment": assignment, "opened": opened, "similarities": similarities,
            "importance": [1.0 + 0.125 * i for i in range(num_tasks)],
            "kept_fraction": [0.5] * num_tasks,
            "group_ranks": [[8 * (assignment[: i + 1].count(k)) for k in range(max_groups)] for i in range(num_tasks)],
        }
        results["method"] = "ham"
    return json.loads(json.dumps(results))


def check_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width > 300 and height > 300, (path, image.size)
    return width, height


def test_write_report_with_groups(tmp_path: Path) -> None:
    results = make_results(3)
    paths = write_report(results, tmp_path / "run")  # creates the folder
    assert set(paths) == PNG_KEYS | {"report"}
    for key in PNG_KEYS:
        assert paths[key] == tmp_path / "run" / f"{key}.png"
        check_png(paths[key])
    md = paths["report"].read_text(encoding="utf-8")
    assert paths["report"].name == "report.md"

    # metrics, formatted (values from continual_metrics on the synthetic counts)
    assert f"| Last accuracy | {results['last_accuracy']:.2f}% |" in md
    assert f"| Average incremental accuracy | {results['average_incremental_accuracy']:.2f}% |" in md
    assert f"| Forgetting | {results['forgetting']:.2f} pp |" in md
    assert f"| BWT | {results['bwt']:+.2f} pp |" in md
    assert "| Groups used | 3 of 3 |" in md
    assert "| Total wall time | 2 min 15 s |" in md  # 30 + 45 + 60 s
    assert "| Peak memory | 1,520.0 MB |" in md
    # the accuracy matrix, row by row (blank above the diagonal, seen-classes accuracy last)
    matrix, seen = results["accuracy_matrix"], results["incremental_accuracy"]
    assert "| after task | 1 | 2 | 3 | seen |" in md  # tasks numbered from 1, as the CLI prints them
    assert f"| 1 | {matrix[0][0]:.2f} |  |  | {seen[0]:.2f} |" in md
    assert f"| 2 | {matrix[1][0]:.2f} | {matrix[1][1]:.2f} |  | {seen[1]:.2f} |" in md
    assert f"| 3 | {matrix[2][0]:.2f} | {matrix[2][1]:.2f} | {matrix[2][2]:.2f} | {seen[2]:.2f} |" in md
    # per-task table, group table, parameters, config, image links
    assert f"| 2 | {seen[1]:.2f} | 45.0 s | 1,510.0 MB |" in md
    assert "| 1 | 0 | yes | – | – | 1.000 | 0.500 | 8, 0, 0 |" in md
    assert "| 3 | 2 | yes | – | 0.700 (slot 1) | 1.250 | 0.500 | 8, 8, 8 |" in md
    assert "| trainable | 1,234,567 |" in md and "| stored_adapter | 98,765 |" in md
    assert '"seed": 1993' in md
    for key in PNG_KEYS:
        assert f"]({key}.png)" in md


def test_write_report_without_groups(tmp_path: Path) -> None:
    results = make_results(3, groups=False)
    results["tasks"][1]["wall_time_s"] = None  # not measured: shown as a dash, not a crash
    results["tasks"][1]["peak_memory_mb"] = None
    paths = write_report(results, tmp_path)
    assert set(paths) == {"accuracy_matrix", "accuracy_over_tasks", "report"}
    assert not (tmp_path / "groups.png").exists()
    for key in ("accuracy_matrix", "accuracy_over_tasks"):
        check_png(paths[key])
    md = paths["report"].read_text(encoding="utf-8")
    assert "## Groups" not in md and "groups.png" not in md and "Groups used" not in md
    assert f"| 2 | {results['incremental_accuracy'][1]:.2f} | – | – |" in md
    assert "| Total wall time | 1 min 30 s |" in md


def test_figures_keys_depend_on_groups() -> None:
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    with_groups = figures(make_results(3))
    without = figures(make_results(3, groups=False))
    assert set(with_groups) == PNG_KEYS
    assert set(without) == {"accuracy_matrix", "accuracy_over_tasks"}
    assert set(figures({**make_results(2, groups=False), "groups": None})) == set(without)
    assert all(isinstance(f, Figure) for f in (*with_groups.values(), *without.values()))
    assert plt.get_fignums() == open_before  # not pyplot-managed: nothing to leak
    # labelled axes, colour bars and titles
    groups_fig = with_groups["groups"]
    assert len(groups_fig.axes) == 3  # two panels + the similarity colour bar
    assert {ax.get_xlabel() for ax in groups_fig.axes[:2]} == {"task", "group slot"}
    matrix_ax = with_groups["accuracy_matrix"].axes[0]
    assert matrix_ax.get_ylabel() and matrix_ax.get_xlabel() and len(with_groups["accuracy_matrix"].axes) == 2
    # small runs are annotated cell by cell: 6 filled cells in a 3-task matrix
    assert len(matrix_ax.texts) == 6


def test_fifty_tasks_render_quickly(tmp_path: Path) -> None:
    results = make_results(50, max_groups=8)
    start = time.perf_counter()
    figs = figures(results)
    assert not figs["accuracy_matrix"].axes[0].texts  # no per-cell numbers above MAX_ANNOTATED_TASKS
    paths = write_report(results, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed  # about 3 s on an idle laptop core
    for key in PNG_KEYS:
        check_png(paths[key])
    md = paths["report"].read_text(encoding="utf-8")
    assert "| 50 |" in md and "| Groups used | 8 of 8 |" in md


def test_summary_lines() -> None:
    results = make_results(3)
    lines = summary_lines(results)
    text = "\n".join(lines)
    assert 3 <= len(lines) <= 6
    assert lines[0].startswith("ham 'synthetic-3': 3 tasks")
    assert f"last accuracy {results['last_accuracy']:.2f}%" in text
    assert f"average incremental accuracy {results['average_incremental_accuracy']:.2f}%" in text
    assert f"forgetting {results['forgetting']:.2f} pp" in text and f"BWT {results['bwt']:+.2f} pp" in text
    assert "groups used 3 of 3 (task -> group: 0 1 2)" in text
    assert "groups" not in "\n".join(summary_lines(make_results(3, groups=False)))
    many = "\n".join(summary_lines(make_results(50, max_groups=8)))
    assert many.count("\n") < 6 and "..." in many  # a long assignment is cut short


@pytest.mark.parametrize(
    "results",
    [
        {"accuracy_matrix": [], "incremental_accuracy": [], "last_accuracy": 0.0,
         "average_incremental_accuracy": 0.0, "forgetting": 0.0, "bwt": 0.0, "tasks": []},
        {"accuracy_matrix": [[55.0]], "last_accuracy": 55.0, "tasks": [{"task": 0, "accuracy_seen": 55.0}],
         "groups": {"max_groups": 2, "assignment": [0], "opened": [True], "similarities": [[None, None]]}},
    ],
    ids=["no-tasks", "one-task-sparse"],
)
def test_degenerate_results_do_not_crash(results: dict[str, Any], tmp_path: Path) -> None:
    paths = write_report(results, tmp_path)
    for key, path in paths.items():
        if key != "report":
            check_png(path)
    assert summary_lines(results)


def test_report_module_is_lightning_free() -> None:
    tree = ast.parse(Path(report.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] in {"lightning", "pytorch_lightning", "torch"} for name in imported)
    assert "matplotlib.pyplot" not in imported


def test_domains_figure_counts_each_domains_tasks_per_group(tmp_path: Path) -> None:
    results = make_results(6, max_groups=3)
    results["groups"]["assignment"] = [0, 1, 0, 2, 1, 0]
    results["task_domains"] = ["signs", "fonts", "signs", "photos", "fonts", "signs"]
    results["groups"]["domain_ari"] = 1.0
    names, counts = report.domain_group_counts(results["task_domains"], results["groups"]["assignment"])
    assert names == ["signs", "fonts", "photos"]
    assert counts.tolist() == [[3, 0, 0], [0, 2, 0], [0, 0, 1]]
    assert "domains_groups" in figures(results)
    paths = write_report(results, tmp_path)
    check_png(paths["domains_groups"])
    assert "adjusted Rand index 1.00" in "\n".join(summary_lines(results))


def _tick_labels(ax: Any, axis: str) -> list[str]:
    ax.figure.canvas.draw()
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks]


def test_plots_are_fitted_to_the_data_numbered_from_1_and_marked() -> None:
    """What a person reads at a glance: colour scales and axes fitted to the values (a point's difference is
    visible), values in the cells, tasks 1..n on whole ticks, a marker on every line (a one-point line shows)."""
    results = make_results(4)
    # near-orthogonal adapters: cosines ~1e-3, some negative
    results["groups"]["similarities"] = [[None] * 3, [2e-3, None, None], [-1e-3, 3e-3, None], [1e-4, -2e-4, 5e-4]]
    figs = figures(results)
    matrix_ax = figs["accuracy_matrix"].axes[0]
    values = [v for row in results["accuracy_matrix"] for v in row if v is not None]
    low, high = matrix_ax.images[0].get_clim()
    assert (low, high) == (pytest.approx(min(values)), pytest.approx(max(values)))
    assert _tick_labels(matrix_ax, "x") == ["1", "2", "3", "4"]
    left, right = figs["accuracy_over_tasks"].axes[:2]
    assert all(line.get_marker() not in (None, "None", "") for line in left.get_lines() if len(line.get_xdata()) > 0
               and line.get_linestyle() != "--")
    assert min(values) - 10 < left.get_ylim()[0] and left.get_ylim()[1] < max(values) + 10  # not 0..100
    assert _tick_labels(right, "x") == ["1", "2", "3", "4"]
    groups_left, sims_ax = figs["groups"].axes[:2]
    assert sims_ax.images[0].get_clim() == (pytest.approx(-3e-3), pytest.approx(3e-3))
    texts = [t.get_text() for t in sims_ax.texts]
    assert "3.0e-03" in texts and not any(t in ("-0.00", "0.00") for t in texts)
    assert _tick_labels(groups_left, "x") == ["1", "2", "3", "4"]


def test_comparison_plot_has_whole_task_ticks(tmp_path: Path) -> None:
    from ham_lightning.lightning.results import compare_runs, comparison_figure

    for name, shift in (("a", 0.0), ("b", 1.5)):
        run = make_results(5, groups=False)
        run["incremental_accuracy"] = [90.0 - shift - k for k in range(5)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(run))
    out = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    check_png(Path(out["files"]["plot"]))
    ax = comparison_figure(out["rows"]).axes[0]
    labels = [t for t in _tick_labels(ax, "x") if t]
    assert labels and all(float(t.replace("\u2212", "-")).is_integer() for t in labels)
    assert 80 < ax.get_ylim()[0] and ax.get_ylim()[1] < 95  # fitted to 84.5..90, not 0..100


def test_report_says_where_the_errors_went(tmp_path: Path) -> None:
    results = make_results(3)
    results["errors"] = {"images": 200, "wrong": 30.0, "within_task": 10.0, "other_task_same_domain": 15.0,
                         "other_domain": 5.0, "confusions": [[0, 1, 20], [1, 3, 30], [4, 0, 10]]}
    line = "30.00 wrong: 10.00 within the image's task, 15.00 another task of its domain, 5.00 another domain"
    assert f"| Errors (% of the last evaluation's images) | {line} |" in write_report(
        results, tmp_path)["report"].read_text(encoding="utf-8")
    assert "Errors" not in write_report(make_results(3), tmp_path / "none")["report"].read_text(encoding="utf-8")
    results["errors"].update(to_later_task=12.0, to_earlier_task=8.0)
    later = f"{line}, 12.00 a later task, 8.00 an earlier task |"
    assert later in write_report(results, tmp_path / "when")["report"].read_text(encoding="utf-8")

"""The run folder's results: ``results.json``, the report and plots, W&B; per-task lines; comparing runs.

* `RunResults` (a callback): at the end of a sequence, write ``results.json``, the report and plots, and log them;
* `TaskLines` (a callback): one line per finished task with its accuracy on the classes seen so far;
* `TestResults` (a callback): ``test``'s per-task and seen-classes accuracy, printed and in ``test_results.json``;
* `compare_runs`: a table and a plot from the ``results.json`` of finished runs (``ham-lightning compare``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from ham_lightning.core.controller import find_controller
from ham_lightning.lightning.sequence import ContinualEvaluation


class RunResults(Callback):
    """Collects what `ContinualEvaluation` measured and writes the run folder (rank zero only).

    Files: ``results.json`` (accuracy matrix, last / average incremental accuracy, forgetting, BWT, groups and
    similarities, parameter counts, wall time and peak memory per task, the resolved config), ``report.md`` and the
    PNG plots of `ham_lightning.report`. Loggers get the per-task metrics with the task index as their step
    (W&B ``define_metric``), the plots as images and the accuracy matrix as a table.

    Args:
        dirpath: the run folder (default: ``trainer.default_root_dir``).
        config: the resolved configuration to store (the CLI passes it).
        run: what identifies the run (run folder and name, benchmark, schedule), stored as ``results["run"]``.
        write_report: also write ``report.md`` and the plots.
    """

    def __init__(self, dirpath: str | None = None, config: dict[str, Any] | None = None,
                 run: dict[str, Any] | None = None, write_report: bool = True) -> None:
        self.dirpath, self.config, self.run, self.write_report = dirpath, config, run, write_report
        self._start: float | None = None
        self._before = 0.0  # wall time of the earlier processes of a resumed run (from the checkpoint)
        self.path: Path | None = None

    def elapsed(self) -> float | None:
        """Seconds of fit so far, every process of a resumed run added up (`fit_wall_time_s`)."""
        if self._start is None:
            return None
        return self._before + time.perf_counter() - self._start

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fit_wall_time_s": self.elapsed() or self._before}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._before = float(state_dict.get("fit_wall_time_s") or 0.0)

    def run_dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                # Per-task curves against the task index rather than the global step.
                logger.experiment.define_metric("cl/task")
                for prefix in ("cl/*", "ham/*"):
                    logger.experiment.define_metric(prefix, step_metric="cl/task")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        continual = next((c for c in trainer.callbacks if isinstance(c, ContinualEvaluation)), None)  # type: ignore[attr-defined]
        if continual is None or not continual.rows:
            return
        results = self.collect(continual, pl_module)
        for key in ("class_order", "task_sizes"):  # the scenario's tasks, so a run's errors can be re-cut later
            value = getattr(trainer.datamodule, key, None)
            if value is not None:
                results[key] = [int(v) for v in value]
        domains = getattr(trainer.datamodule, "task_domains", None)
        if domains is not None:  # a mixed-domain scenario: the source of every task
            results["task_domains"] = list(domains)
            assignment = (results.get("groups") or {}).get("assignment")
            if assignment and len(assignment) == len(domains) > 1:
                from sklearn.metrics import adjusted_rand_score

                # 1: the groups are exactly the domains; ~0: no relation (chance)
                results["groups"]["domain_ari"] = float(adjusted_rand_score(domains, assignment))
        results["fit_wall_time_s"] = self.elapsed()
        self._write(trainer, results)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Stopped (SIGTERM, Ctrl-C) after the last task's boundary: the sequence is complete, so its results are.
        continual = _continual(trainer)
        num_tasks = getattr(trainer.datamodule, "num_tasks", None)
        if continual is not None and num_tasks and len(continual.rows) == num_tasks and self.path is None:
            self.on_fit_end(trainer, pl_module)

    def collect(self, continual: ContinualEvaluation, pl_module: LightningModule) -> dict[str, Any]:
        """The results dict: `ContinualEvaluation.results` + parameter counts, method and config."""
        results = continual.results()
        controller = find_controller(pl_module)
        params = {"total": sum(p.numel() for p in pl_module.parameters()),
                  "trainable_total": sum(p.numel() for p in pl_module.parameters() if p.requires_grad)}
        if controller is not None:
            counts = controller.num_parameters()
            params.update({"trainable": counts["trainable"], "stored_adapter": counts["adapter_stored"]})
        results["params"] = params
        results["method"] = getattr(pl_module, "method_name", "ham" if controller is not None else "unknown")
        results["num_tasks_done"] = len(continual.rows)
        if self.config is not None:
            results["config"] = self.config
            data = self.config.get("data") or {}
            results["dataset"] = data.get("dataset")
        if self.run is not None:
            results["run"] = self.run
            # The report's titles name the run and its data set.
            results["name"] = " · ".join(str(x) for x in (self.run.get("run_name"), results.get("dataset")) if x)
        return results

    @rank_zero_only
    def _write(self, trainer: Trainer, results: dict[str, Any]) -> None:
        from ham_lightning import report

        run_dir = self.run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "results.json"
        self.path.write_text(results_json(results))
        files: dict[str, Path] = {}
        if self.write_report:
            files = report.write_report(results, run_dir)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                _log_to_wandb(logger, results, files)
        rank_zero_info("\n".join([*report.summary_lines(results), f"Results: {self.path}",
                                  *(f"Report: {files['report']}" for _ in [0] if "report" in files)]))


def _log_to_wandb(logger: WandbLogger, results: dict[str, Any], files: dict[str, Path]) -> None:
    """Plots as images, the accuracy matrix as a table, the summary metrics in the run summary."""
    for name, path in files.items():
        if path.suffix == ".png":  # one key per plot: W&B wants images of one key to share a size
            logger.log_image(f"plots/{name}", images=[str(path)])
    matrix = results["accuracy_matrix"]
    columns = ["after_task"] + [f"task_{j + 1}" for j in range(len(matrix))]  # 1-based, as the report's
    logger.log_table("accuracy_matrix", columns=columns, data=[[i + 1, *row] for i, row in enumerate(matrix)])
    summary = logger.experiment.summary
    for key in ("last_accuracy", "average_incremental_accuracy", "forgetting", "bwt"):
        summary[key] = results[key]


def _jsonable(value: Any) -> Any:
    """Plain JSON: NaN/inf as null, tuples as lists, paths as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def results_json(value: Any, indent: int = 2) -> str:
    """`_jsonable(value)` as indented JSON with every list of plain values on one line: an accuracy matrix a row a
    line, ``errors``' confusions a ``[true, predicted, count]`` a line (not one number a line, as ``indent`` alone)."""

    def write(v: Any, level: int) -> str:
        pad, inner = " " * (indent * level), " " * (indent * (level + 1))
        if isinstance(v, dict) and v:
            items = [f"{inner}{json.dumps(k)}: {write(x, level + 1)}" for k, x in v.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            return "[\n" + ",\n".join(f"{inner}{write(x, level + 1)}" for x in v) + f"\n{pad}]"
        return json.dumps(v)

    return write(_jsonable(value), 0)


class TaskLines(Callback):
    """One line per finished task: its accuracy on every class seen so far, each seen task's, and its time.

    Reads what `ContinualEvaluation` appended at the boundary (it must come before this callback in the list).
    """

    def __init__(self) -> None:
        self._printed = 0

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        continual = _continual(trainer)
        self._printed = len(continual.rows) if continual is not None else 0  # a resumed run: shown before

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print_new(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print_new(trainer)

    def _print_new(self, trainer: Trainer) -> None:
        continual = _continual(trainer)
        if continual is None or not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        num_tasks = getattr(datamodule, "num_tasks", None)
        for i in range(self._printed, len(continual.rows)):
            line = task_line(i, num_tasks, continual.rows[i], continual.task_records[i]
                             if i < len(continual.task_records) else {})
            bar = trainer.progress_bar_callback
            if bar is not None and hasattr(bar, "print"):
                bar.print(line)  # above the bar, not through it
            else:
                rank_zero_info(line)
        self._printed = len(continual.rows)


def task_line(task: int, num_tasks: int | None, row: list[tuple[int, int]], record: dict[str, Any]) -> str:
    """``task 2/5: 81.3% on the 6 seen classes' images (tasks: 90.0 72.5 81.0) | 12.3 s`` for one boundary."""
    correct, total = sum(c for c, _ in row), sum(n for _, n in row)
    per_task = " ".join(f"{100.0 * c / n:.1f}" if n else "-" for c, n in row)
    of = f"/{num_tasks}" if num_tasks else ""
    seconds = record.get("wall_time_s")
    timing = f" | trained in {seconds:.1f} s" if seconds is not None else ""
    return (f"task {task + 1}{of} done: accuracy on seen classes {100.0 * correct / max(1, total):.2f}% "
            f"(per task: {per_task}){timing}")


class TestResults(Callback):
    """``test``'s results as ``fit`` shows them: accuracy in percent on the classes seen (all test images of the
    tasks evaluated) and per task, printed and written to ``<dirpath>/test_results.json``.

    Reads the per-task accuracies `HAMModule` logs (``test/acc``, one value per task's loader) and the loaders'
    sizes, so the seen-classes figure weighs every image once, as `ContinualEvaluation` does."""

    def __init__(self, dirpath: str, run: dict[str, Any] | None = None) -> None:
        self.dirpath, self.run = Path(dirpath), run
        self.path: Path | None = None
        self.results: dict[str, Any] | None = None

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.test_dataloaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        metrics = trainer.callback_metrics
        rows: list[tuple[int, int]] = []
        for j, loader in enumerate(loaders):
            value = metrics.get(f"test/acc_task_{j}", metrics.get(f"test/acc/dataloader_idx_{j}"))
            if value is None and len(loaders) == 1:
                value = metrics.get("test/acc")
            size = len(loader.dataset) if hasattr(loader, "dataset") else 0
            rows.append((round(float(value) * size) if value is not None else 0, size))
        correct, total = sum(c for c, _ in rows), sum(n for _, n in rows)
        self.results = {
            "accuracy_seen": 100.0 * correct / max(1, total),
            "accuracy_per_task": [100.0 * c / n if n else None for c, n in rows],
            "counts": [list(r) for r in rows],
            "num_tasks_evaluated": len(rows),
            "run": self.run,
        }
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.path = self.dirpath / "test_results.json"
        self.path.write_text(results_json(self.results))
        per_task = " ".join(f"{100.0 * c / n:.1f}" if n else "-" for c, n in rows)
        rank_zero_info(f"test of {len(rows)} task{'s' if len(rows) != 1 else ''}: accuracy on seen classes "
                       f"{self.results['accuracy_seen']:.2f}% (per task: {per_task})\nResults: {self.path}")


def _continual(trainer: Trainer) -> ContinualEvaluation | None:
    return next((c for c in trainer.callbacks if isinstance(c, ContinualEvaluation)), None)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------- comparing runs


def load_run(path: str | Path) -> dict[str, Any]:
    """A run's ``results.json`` from its folder (or the file itself); `FileNotFoundError` names what is missing."""
    path = Path(path)
    file = path if path.is_file() else path / "results.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no results.json (a run that has not finished, or not a run folder).")
    results = json.loads(file.read_text())
    results.setdefault("run", {}).setdefault("run_dir", str(file.parent))
    return results


def comparison_row(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run in a comparison table."""
    from ham_lightning.report import wall_time

    run = results.get("run") or {}
    wall = wall_time(results)
    return {
        "run": run.get("run_name") or Path(run.get("run_dir", "?")).name,
        "method": results.get("method"),
        "dataset": results.get("dataset"),
        "tasks": len(results.get("accuracy_matrix") or []),
        "last_accuracy": results.get("last_accuracy"),
        "average_incremental_accuracy": results.get("average_incremental_accuracy"),
        "forgetting": results.get("forgetting"),
        "bwt": results.get("bwt"),
        "wall_time_s": wall,
        "incremental_accuracy": results.get("incremental_accuracy") or [],
        # where the last evaluation's wrong predictions went (percent of its images; see `error_breakdown`)
        **{f"errors_{k}": (results.get("errors") or {}).get(k) for k in ("within_task", "to_later_task",
                                                                          "to_earlier_task")},
    }


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: run, method, data set, tasks, last / average incremental accuracy, forgetting, BWT, the
    errors within the image's task and into a later / an earlier task, time."""
    def num(value: Any, digits: int = 2) -> str:
        return "-" if value is None else f"{float(value):.{digits}f}"

    lines = ["| run | method | data set | tasks | last acc (%) | avg inc acc (%) | forgetting (pp) | BWT (pp) | "
             "err. within task (%) | err. to later / earlier task (%) | wall (s) |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method'] or '-'} | {r['dataset'] or '-'} | {r['tasks']} | "
                     f"{num(r['last_accuracy'])} | {num(r['average_incremental_accuracy'])} | "
                     f"{num(r['forgetting'])} | {num(r['bwt'])} | {num(r.get('errors_within_task'))} | "
                     f"{num(r.get('errors_to_later_task'))} / {num(r.get('errors_to_earlier_task'))} | "
                     f"{num(r['wall_time_s'], 0)} |")
    return "\n".join(lines)


def compare_runs(paths: list[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Compare finished runs from their ``results.json`` (nothing is re-run): table, JSON and a plot.

    Rows are sorted by last accuracy (best first). With ``out``, writes ``compare.md``, ``compare.json`` and
    ``compare.png`` (accuracy on seen classes after each task, one line per run) there.
    """
    rows = sorted((comparison_row(load_run(p)) for p in paths),
                  key=lambda r: -(r["last_accuracy"] if r["last_accuracy"] is not None else -1.0))
    table = comparison_table(rows)
    result: dict[str, Any] = {"rows": rows, "table": table, "files": {}}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table + "\n")
        (out / "compare.json").write_text(results_json(rows))
        result["files"] = {"table": str(out / "compare.md"), "json": str(out / "compare.json"),
                           "plot": str(_comparison_plot(rows, out / "compare.png"))}
    return result


def _comparison_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    comparison_figure(rows).savefig(path, dpi=120, facecolor="white")
    return path


def comparison_figure(rows: list[dict[str, Any]]) -> Any:
    """Accuracy on seen classes after each task, one labelled line per run (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    from matplotlib.ticker import MaxNLocator

    ax = fig.subplots()
    for r in rows:
        acc = r["incremental_accuracy"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3, label=f"{r['run']} ({r['method']})")
    values = [float(v) for r in rows for v in r["incremental_accuracy"] if v is not None]
    if values:  # fitted to the runs: their differences are often a point or two
        margin = max(0.08 * (max(values) - min(values)), 1.0)
        ax.set_ylim(max(0.0, min(values) - margin), min(100.0, max(values) + margin))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # tasks are whole: 1, 2, ... (as the run reports)
    ax.set(xlabel="after training task", ylabel="accuracy on seen classes (%)",
           title="Accuracy after each task: " + ", ".join(sorted({str(r["dataset"]) for r in rows})))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig

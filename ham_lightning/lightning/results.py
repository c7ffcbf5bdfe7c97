"""`RunResults`: at the end of a sequence, write ``results.json``, the report and plots, and log them to W&B."""

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

from ham_lightning.lightning.sequence import ContinualEvaluation
from ham_lightning.core.controller import find_controller


class RunResults(Callback):
    """Collects what `ContinualEvaluation` measured and writes the run folder (rank zero only).

    Files: ``results.json`` (accuracy matrix, last / average incremental accuracy, forgetting, BWT, groups and
    similarities, parameter counts, wall time and peak memory per task, the resolved config), ``report.md`` and the
    PNG plots of `ham_lightning.report`. Loggers get the per-task metrics with the task index as their step
    (W&B ``define_metric``), the plots as images and the accuracy matrix as a table.

    Args:
        dirpath: the run folder (default: ``trainer.default_root_dir``).
        config: the resolved configuration to store (the CLI passes it).
        write_report: also write ``report.md`` and the plots.
    """

    def __init__(self, dirpath: str | None = None, config: dict[str, Any] | None = None,
                 write_report: bool = True) -> None:
        self.dirpath, self.config, self.write_report = dirpath, config, write_report
        self._start: float | None = None
        self.path: Path | None = None

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
        results["fit_wall_time_s"] = time.perf_counter() - self._start if self._start else None
        self._write(trainer, results)

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
        return results

    @rank_zero_only
    def _write(self, trainer: Trainer, results: dict[str, Any]) -> None:
        from ham_lightning import report

        run_dir = self.run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "results.json"
        self.path.write_text(json.dumps(_jsonable(results), indent=2))
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
    columns = ["after_task"] + [f"task_{j}" for j in range(len(matrix))]
    logger.log_table("accuracy_matrix", columns=columns, data=[[i, *row] for i, row in enumerate(matrix)])
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

"""How much the statistics head loses to stale statistics (issue 22, item 3).

A statistics head (ridge) sums each task's features once, after that task's merge: when a later task joins the same
group, the earlier tasks' features change and their sums do not. This runs one ``ham-lightning fit`` of ``--config``
on held-out training images, then fits a fresh head of the same kind on every task's training images passed
through the *final* model (what an exemplar-based method could do, and what no exemplar-free one can), and
evaluates both heads on the same held-out images. The difference is the most that correcting the statistics could
recover; what is left between the refitted head and ``joint`` is in the features themselves.

    python benchmarks/stale_statistics.py --config configs/domains_lite0_cpu.yaml --num_tasks 10 \\
        --out benchmarks/results/domains_lite0_cpu/stale_statistics/T10.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def accuracy(model: Any, dm: Any, num_tasks: int) -> dict[str, Any]:
    """Accuracy over every task's held-out images among all seen classes (overall and per task)."""
    from ham_lightning.lightning.evaluation import evaluate_tasks

    dm.set_task(num_tasks - 1)
    loaders = dm.test_dataloader()
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    seen = [c for t in range(num_tasks) for c in dm.task_classes(t)]
    model.eval()
    counts = evaluate_tasks(model, loaders[:num_tasks], seen, dm.num_classes, model.device, None)
    correct, total = sum(c for c, _ in counts), sum(n for _, n in counts)
    return {"accuracy": 100.0 * correct / total, "per_task": [100.0 * c / n for c, n in counts]}


def refit_head(model: Any, dm: Any, num_tasks: int) -> Any:
    """A fresh head like ``model.head`` fitted task by task on every task's training images under the final model."""
    from ham_lightning.core.grouped_head import GroupedHead
    from ham_lightning.core.heads import create_head
    from ham_lightning.lightning.statistics import statistics_pass

    old = model.head

    def make_head() -> Any:
        return create_head(model.hparams.head, old.in_features, old.num_classes, mask=model.hparams.head_mask,
                           freeze_old_rows=model.hparams.freeze_old_rows, scale=model.hparams.head_scale,
                           **(model.hparams.head_kwargs or {}))

    if isinstance(old, GroupedHead):  # a head per group (route_head): the same slots, every class's known already
        fresh = GroupedHead(old.in_features, old.num_classes, len(old.heads), make_head)
        fresh.class_slot.copy_(old.class_slot)
    else:
        fresh = make_head()
    fresh = fresh.to(model.device)
    model.head = fresh  # forward calls it: the statistics pass feeds it what the final model computes
    try:
        for task in range(num_tasks):
            dm.set_task(task)
            fresh.start_task(dm.task_classes(task))
            statistics_pass(model, dm.train_dataloader(), [fresh])
            fresh.end_task()
    finally:
        model.head = old
    return fresh


def heldout_fit(config: str, num_tasks: int, validation: float, extra: Sequence[str], name: str) -> tuple[Any, float]:
    """One ``ham-lightning fit`` of ``config`` on held-out training images (no checkpoints, no progress bars),
    named ``<name>_T<num_tasks>``: the CLI app (its model and datamodule as the fit left them) and its seconds."""
    from ham_lightning.cli.app import cli

    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    app = cli(["fit", "--config", config, f"--data.num_tasks={num_tasks}", f"--data.validation_fraction={validation}",
               "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
               "--run_name", f"{name}_T{num_tasks}", *extra])
    return app, time.perf_counter() - start


def run(config: str, num_tasks: int, validation: float, extra: Sequence[str]) -> dict[str, Any]:
    app, fit_s = heldout_fit(config, num_tasks, validation, extra, "stale_statistics")
    model, dm = app.model, app.datamodule
    as_trained = accuracy(model, dm, num_tasks)
    fresh = refit_head(model, dm, num_tasks)
    old, model.head = model.head, fresh
    try:
        refitted = accuracy(model, dm, num_tasks)
    finally:
        model.head = old
    return {"config": config, "num_tasks": num_tasks, "validation_fraction": validation, "extra": list(extra),
            "task_domains": getattr(dm, "task_domains", None), "as_trained": as_trained, "refitted": refitted,
            "recoverable": refitted["accuracy"] - as_trained["accuracy"], "fit_wall_time_s": fit_s,
            "threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/domains_lite0_cpu.yaml")
    parser.add_argument("--num_tasks", type=int, default=10)
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/domains_lite0_cpu/stale_statistics/T10.json"))
    parser.add_argument("extra", nargs="*", help="after --: more ham-lightning arguments")
    args = parser.parse_args(argv)
    result = run(args.config, args.num_tasks, args.validation, args.extra)
    print(f"| head | held-out accuracy |\n|:---|---:|\n| as trained (statistics summed after each merge) | "
          f"{result['as_trained']['accuracy']:.2f} |\n| refitted on every task under the final model | "
          f"{result['refitted']['accuracy']:.2f} |\nrecoverable by fresher statistics: {result['recoverable']:+.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

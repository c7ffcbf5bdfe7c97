"""The adapted part's BatchNorm statistics re-estimated on the scenario's training images (AdaBN), on frozen
features: does normalising for the new domain help before any adapter trains?

The configs keep every BatchNorm at its ImageNet running statistics (`ham_lightning.core.norm`). Per-group
statistics would be a cheap group-level lever (folded into each group's copy of the top part, no inference cost), so
its ceiling is measured first without adapters: one frozen-backbone fit of ``--config`` on held-out training images
(`ridge_lambda.capture`), with the statistics of every BatchNorm below the cut left alone (the configs cache the
prefix, so only the adapted part runs) and those above it (all, or the last only) replaced, before the fit, by the
mean and variance of their inputs over the training images of every task or of the first only (``--modes``; each
BatchNorm's input depends on the ones before it, so the pass is repeated ``--rounds`` times). The ridge head is the
config's, fitted as in every run. Prints a table and writes JSON.

    python benchmarks/norm_statistics.py --config configs/gtsrb_lite0_cpu.yaml --num_tasks 10 \\
        --out benchmarks/results/gtsrb_lite0_cpu/norm_statistics_T10.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ridge_lambda import capture
from torch import nn
from torch.utils.data import DataLoader

#: mode -> (tasks whose images give the statistics: "all" or the first only, which BatchNorms: "all" or "last")
MODES: dict[str, tuple[str, str]] = {
    "imagenet": ("none", "all"),
    "all_tasks": ("all", "all"),
    "first_task": ("first", "all"),
    "all_tasks_last_norm": ("all", "last"),
}


@torch.no_grad()
def reestimate(module: Any, tasks: Sequence[int], which: str, rounds: int) -> int:
    """Replace the running statistics of the BatchNorms the adapted part runs (``which``: all or only the last)
    by their inputs' mean and variance over ``tasks``' training images; returns how many were replaced."""
    norms = [m for m in module.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    datamodule = module.trainer.datamodule
    replaced = 0
    for _ in range(rounds):
        sums: dict[int, list[Any]] = {}

        def hook(norm: nn.Module, args: tuple[torch.Tensor, ...], sums: dict[int, list[Any]] = sums) -> None:
            x = args[0].double()
            s = sums.setdefault(id(norm), [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + x.sum((0, 2, 3)), s[1] + (x * x).sum((0, 2, 3)), s[2] + x.numel() // x.shape[1]

        handles = [n.register_forward_pre_hook(hook) for n in norms]
        try:
            for task in tasks:
                for x, _ in DataLoader(datamodule.task_dataset(task, "train"), batch_size=256):
                    module.features(x)
        finally:
            for h in handles:
                h.remove()
        ran = [n for n in norms if id(n) in sums]  # the adapted part's, in forward order
        chosen = ran if which == "all" else ran[-1:]
        for norm in chosen:
            total, squares, count = sums[id(norm)]
            mean = total / count
            norm.running_mean.copy_(mean.float())
            norm.running_var.copy_((squares / count - mean * mean).clamp_min(0).float())
        replaced = len(chosen)
        if which == "last":
            break  # nothing after it to re-estimate
    return replaced


def run(config: str, num_tasks: int, validation: float, mode: str, rounds: int) -> dict[str, Any]:
    from ham_lightning.lightning.module import HAMModule

    source, which = MODES[mode]
    start, replaced = HAMModule.on_fit_start, []

    def on_fit_start(self: HAMModule) -> None:
        start(self)
        if source != "none" and not replaced:
            tasks = range(self.trainer.datamodule.num_tasks) if source == "all" else [0]
            replaced.append(reestimate(self, list(tasks), which, rounds))

    HAMModule.on_fit_start = on_fit_start  # type: ignore[method-assign]
    try:
        run_name = f"norm_statistics_{Path(config).stem}_{mode}_T{num_tasks}"
        capture(config, num_tasks, validation, run_name)
    finally:
        HAMModule.on_fit_start = start  # type: ignore[method-assign]
    result = json.loads((Path("runs") / run_name / "results.json").read_text())
    return {"last_accuracy": result["last_accuracy"], "norms_replaced": replaced[0] if replaced else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gtsrb_lite0_cpu.yaml")
    parser.add_argument("--num_tasks", type=int, default=10)
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gtsrb_lite0_cpu/norm_statistics_T10.json"))
    args = parser.parse_args()
    rows = {mode: run(args.config, args.num_tasks, args.validation, mode, args.rounds) for mode in args.modes}
    print(f"frozen ridge, held-out images ({args.validation:.0%}), {args.num_tasks} tasks\n"
          "| BatchNorm statistics | norms replaced | last acc |\n|:---|---:|---:|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['norms_replaced']} | {row['last_accuracy']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "num_tasks": args.num_tasks,
                                    "validation_fraction": args.validation, "rounds": args.rounds,
                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

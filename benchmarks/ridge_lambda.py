"""The ridge head's ``lam``: held-out accuracy for every ``lam`` on frozen features, and what each
``lambda_holdout`` rule chooses, at several task counts of one run's features.

One frozen-backbone ``ham-lightning fit`` (``--model.adapt=false --model.head=ridge``, on held-out training images)
is run in this process with the ridge head's inputs recorded: the training batches of every statistics pass (with
their task) and the evaluation after the last task. The batches are then fed again to fresh `RidgeHead`s, grouped
into fewer tasks (consecutive tasks merged), so one run gives every task count that divides its own. Prints a table
and writes JSON.

    python benchmarks/ridge_lambda.py --config configs/domains_lite0_cpu.yaml --num_tasks 50 --group 1 5 \\
        --out benchmarks/results/domains_lite0_cpu/lambda_holdout/curve.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ham_lightning.core.heads import RidgeHead


def capture(config: str, num_tasks: int, validation: float, run_name: str) -> dict[str, Any]:
    """Run the frozen ridge fit with its head's inputs recorded (train batches per task; the last evaluation)."""
    from ham_lightning.cli.app import cli
    from ham_lightning.lightning.evaluation import TaskAccuracy

    train: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    classes: list[list[int]] = []
    evaluation: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    latest: list[torch.Tensor] = []
    update, forward, start = RidgeHead.update, RidgeHead.forward, RidgeHead.start_task
    accuracy_update = TaskAccuracy.update

    def record_update(self: RidgeHead, features: torch.Tensor, labels: torch.Tensor) -> None:
        train.append((features.detach().float().cpu().clone(), labels.cpu().clone(), len(classes) - 1))
        update(self, features, labels)

    def record_forward(self: RidgeHead, features: torch.Tensor) -> torch.Tensor:
        latest[:] = [features.detach().float().cpu().clone()]
        return forward(self, features)

    def record_start(self: RidgeHead, task_classes: Any) -> None:
        classes.append([int(c) for c in task_classes])
        start(self, task_classes)

    def record_accuracy(self: TaskAccuracy, preds: torch.Tensor, target: torch.Tensor, task: int = 0) -> None:
        if len(classes) not in evaluation:  # a new evaluation: keep only the latest
            evaluation.clear()
            evaluation[len(classes)] = []
        evaluation[len(classes)].append((latest[0], target.cpu().clone()))
        accuracy_update(self, preds, target, task)

    RidgeHead.update, RidgeHead.forward, RidgeHead.start_task = record_update, record_forward, record_start
    TaskAccuracy.update = record_accuracy
    try:
        cli(["fit", "--config", config, "--model.adapt=false", "--model.head=ridge", "--data.epochs_per_task=1",
              f"--data.validation_fraction={validation}", f"--data.num_tasks={num_tasks}",
              "--trainer.enable_progress_bar=false", "--run_name", run_name])
    finally:
        RidgeHead.update, RidgeHead.forward, RidgeHead.start_task = update, forward, start
        TaskAccuracy.update = accuracy_update
    (rows,) = evaluation.values()
    return {"train": train, "classes": classes, "eval": rows}


def refit(data: dict[str, Any], group: int, **head_kwargs: Any) -> RidgeHead:
    """A fresh ridge head fed the recorded batches, ``group`` consecutive tasks making one task."""
    dim, num_classes = data["train"][0][0].shape[1], 1 + max(max(c) for c in data["classes"])
    head, current = RidgeHead(dim, num_classes, **head_kwargs), None
    for features, labels, task in data["train"]:
        if task // group != current:
            if current is not None:
                head.fit()
            current = task // group
            head.start_task(sorted(c for t, cs in enumerate(data["classes"]) if t // group == current for c in cs))
        head.update(features, labels)
    head.fit()
    return head


def accuracy(head: RidgeHead, features: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((head(features).argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/domains_lite0_cpu.yaml")
    parser.add_argument("--num_tasks", type=int, default=50)
    parser.add_argument("--group", type=int, nargs="+", default=[1, 5], help="consecutive tasks merged into one")
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/domains_lite0_cpu/lambda_holdout/curve.json"))
    args = parser.parse_args()
    data = capture(args.config, args.num_tasks, args.validation, "ridge_lambda_curve")
    features, labels = torch.cat([f for f, _ in data["eval"]]), torch.cat([y for _, y in data["eval"]])
    head = refit(data, group=len(data["classes"]))  # one task: the Gram of every training row
    eigvals, Q = torch.linalg.eigh(head.gram)
    projected, rhs = head.expand(features).double() @ Q, Q.T @ head.targets
    curve = {}
    for k in range(-2, 8):
        scores = (projected / (eigvals.clamp_min(0) + 10.0 ** k)) @ rhs
        curve[f"1e{k}"] = 100.0 * float((scores.argmax(1) == labels).float().mean())
    print(f"{len(labels)} held-out images; accuracy of the ridge on every training row, by lam:")
    print("| lam | accuracy |\n|---:|---:|\n" + "\n".join(f"| {k} | {v:.2f} |" for k, v in curve.items()))
    rules = []
    for group in args.group:
        for rule in ("newest_task", "all_tasks"):
            fitted = refit(data, group, lambda_holdout=rule)
            rules.append({"tasks": len(data["classes"]) // group, "lambda_holdout": rule, "lam": float(fitted.lam),
                          "accuracy": accuracy(fitted, features, labels)})
    print("| tasks | lambda_holdout | lam chosen | accuracy |\n|---:|:---|---:|---:|\n" + "\n".join(
        f"| {r['tasks']} | {r['lambda_holdout']} | {r['lam']:g} | {r['accuracy']:.2f} |" for r in rules))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "num_tasks": args.num_tasks,
                                    "validation_fraction": args.validation, "held_out_images": len(labels),
                                    "accuracy_by_lam": curve, "rules": rules}, indent=2))


if __name__ == "__main__":
    main()

"""How much of a run's accuracy is left to its head: the final features under a classifier trained on every image.

Runs one ``ham-lightning fit`` of ``--config`` on held-out training images, then passes every task's training
images (the cached views) and the held-out images through the *final* model (routed as in inference) and fits a
multinomial logistic regression over every class on those features (full-batch L-BFGS, what only a method that
keeps every image could do). Printed beside the run's own head: if the logistic head is far above it, the
features separate the classes and the statistics head does not; if not, the features are the limit. The
logistic head's errors are split like the run's (`error_shares`: within a task, into a later or an earlier task).

    python benchmarks/head_headroom.py --config configs/domains_lite0_cpu.yaml --num_tasks 50 \\
        --out benchmarks/results/domains_lite0_cpu/head_headroom/T50.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stale_statistics import heldout_fit  # noqa: E402


@torch.no_grad()
def features(model: Any, loaders: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """Every batch's final-model features (eval mode, routed as in inference) and labels."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    model.eval()
    feats, labels = [], []
    for loader in loaders:
        for x, y in loader:
            x = move_data_to_device(x, model.device)
            feats.append(model.features(x).float().cpu())
            labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def logistic_head(x: Tensor, y: Tensor, classes: Tensor, weight_decay: float, steps: int) -> tuple[Tensor, Tensor]:
    """A multinomial logistic regression over ``classes`` on standardized features (L-BFGS, full batch)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    index = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long)
    index[classes] = torch.arange(len(classes))
    target = index[y]
    W = torch.zeros(z.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, target) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (W.detach() / std[:, None]), (b.detach() - (mean / std) @ W.detach())


def run(config: str, num_tasks: int, validation: float, weight_decay: float, steps: int,
        extra: Sequence[str]) -> dict[str, Any]:
    from torchmetrics.classification import MulticlassConfusionMatrix

    from ham_lightning.lightning.evaluation import error_breakdown

    start = time.perf_counter()
    app, fit_s = heldout_fit(config, num_tasks, validation, extra, "head_headroom")
    model, dm = app.model, app.datamodule
    train_loaders = []
    for task in range(num_tasks):
        dm.set_task(task)
        train_loaders.append(dm.train_dataloader())
    dm.set_task(num_tasks - 1)
    test = dm.test_dataloader()
    test = list(test) if isinstance(test, (list, tuple)) else [test]
    x, y = features(model, train_loaders)
    xt, yt = features(model, test[:num_tasks])
    classes = torch.tensor(sorted({c for t in range(num_tasks) for c in dm.task_classes(t)}))
    W, b = logistic_head(x, y, classes, weight_decay, steps)
    pred = classes[(xt @ W + b).argmax(1)]
    class_task = {c: t for t in range(num_tasks) for c in dm.task_classes(t)}
    confmat = MulticlassConfusionMatrix(dm.num_classes, validate_args=False)(pred, yt)
    shares = error_breakdown(confmat, class_task, getattr(dm, "task_domains", None))
    shares.pop("confusions")
    kept = [c.results() for c in app.trainer.callbacks if callable(getattr(c, "results", None))]  # the run's own
    own = next((r for r in kept if isinstance(r, dict) and "last_accuracy" in r), None)
    return {"config": config, "num_tasks": num_tasks, "validation_fraction": validation, "extra": list(extra),
            "weight_decay": weight_decay, "steps": steps, "train_features": len(y), "heldout_images": len(yt),
            "logistic_accuracy": 100.0 * float((pred == yt).float().mean()), "logistic_errors": shares,
            "own_last_accuracy": None if own is None else own.get("last_accuracy"),
            "own_errors": None if own is None else {k: v for k, v in (own.get("errors") or {}).items()
                                                    if k != "confusions"},
            "fit_wall_time_s": fit_s, "wall_time_s": time.perf_counter() - start, "threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/domains_lite0_cpu.yaml")
    parser.add_argument("--num_tasks", type=int, default=10)
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/domains_lite0_cpu/head_headroom/T10.json"))
    parser.add_argument("extra", nargs="*", help="after --: more ham-lightning arguments")
    args = parser.parse_args(argv)
    result = run(args.config, args.num_tasks, args.validation, args.weight_decay, args.steps, args.extra)
    print(f"| head | held-out accuracy |\n|:---|---:|\n| the run's own | {result['own_last_accuracy']} |\n"
          f"| logistic regression on every image's final features | {result['logistic_accuracy']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

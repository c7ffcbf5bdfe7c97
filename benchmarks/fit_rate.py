"""``ham-lightning fit`` on the CPU protocol against the bare frozen top part's training step (issue 12).

One process: the bare reference is timed, then the committed config is fitted through the CLI with Lightning's
``SimpleProfiler``, then the bare reference is timed again on the same cached batches. The bare reference is the
same backbone cut at the same ``adapt_from`` with no adapters: the top part forward, backward to its cached input
(the work any adapter's gradient needs), a linear head and Adam on it; BatchNorm in eval mode, as in fit. It is
timed in both memory formats (contiguous and channels-last) and the faster is the reference.

Reported: training images per second of fit (images / time in training batches and their data loading) and of
the whole fit (images / wall time, boundaries included), the bare rate, their ratios, and where fit's time goes
(profiler actions grouped as data, forward, backward, optimizer and per-step hooks, task boundaries).

    python benchmarks/fit_rate.py --config configs/tiny_imagenet_lite0_cpu.yaml -- --data.num_tasks=10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def bare_rate(model: Any, loader: Any, num_classes: int, repeats: int = 3,
              channels_last: bool = False) -> list[float]:
    """Images per second of the bare top part's training step over ``loader``, once per repeat.

    ``channels_last``: the top part and its cached input in channels-last memory format (HAM's 1x1 convs hand
    their output on in that layout, which speeds up the ops after them, so the bare part is timed both ways).
    """
    from ham_lightning.lightning.module import HAMModule

    bare = HAMModule(model.hparams.backbone, num_classes=num_classes, pretrained=False, ham=model.ham_config,
                     adapt=False, head="linear")  # weights do not change the time; no download needed
    bare.eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    bare.to(memory_format=layout)
    head = bare.head.linear  # the bare module's own linear head, trained directly (no masking: timing only)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    batches = list(loader)
    rates = []
    for _ in range(repeats):
        start, images = time.perf_counter(), 0
        for x, y in batches:
            h = x["prefix"].float().contiguous(memory_format=layout).requires_grad_(True)
            loss = F.cross_entropy(head(bare.features({"prefix": h})), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            images += y.shape[0]
        rates.append(images / (time.perf_counter() - start))
    return rates


GROUPS = {  # profiler action (substring) -> group; the first match wins
    "[TaskBoundary]merge": "task boundary: merge",
    "[TaskBoundary]statistics pass": "task boundary: statistics pass, head fit, input subspace",
    "[TaskBoundary]evaluate": "task boundary: evaluation on the seen tasks",
    "train_dataloader_next": "data",
    "training_step": "forward (training_step)",
    "backward": "backward",
    "optimizer_step": "optimizer_step (incl. forward and backward)",
    "on_train_batch_end": "per-step hooks (after each batch)",
    "on_before_optimizer_step": "per-step hooks (after each batch)",
    "on_train_epoch_end": "epoch-end hooks (each includes its task boundary's phases above)",
    "on_train_epoch_start": "epoch-start hooks",
}


def breakdown(durations: dict[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for action, times in durations.items():
        group = next((g for key, g in GROUPS.items() if key in action), None)
        if group is not None:
            out[group] = out.get(group, 0.0) + sum(times)
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_imagenet_lite0_cpu.yaml")
    parser.add_argument("--out", type=Path, default=RESULTS / "fit_rate_cpu.json")
    parser.add_argument("--runs_dir", default="runs/fit_rate")
    parser.add_argument("extra", nargs="*", help="after --: more ham-lightning arguments")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from ham_lightning.cli import cli

    run_name = f"fit_rate-{int(time.time())}"
    fit_args = ["fit", "--config", args.config, *args.extra, "--trainer.profiler=simple",
                "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                f"--runs_dir={args.runs_dir}"]
    # The same model and data, built without fitting, to time the bare step before the fit.
    built = cli([*fit_args[1:], f"--run_name={run_name}-bare"], run=False)
    data = built.datamodule
    data.setup("fit")
    data.set_task(0)
    before = bare_rate(built.model, data.train_dataloader(), data.num_classes)
    before_cl = bare_rate(built.model, data.train_dataloader(), data.num_classes, channels_last=True)

    start = time.perf_counter()
    fitted = cli([*fit_args, f"--run_name={run_name}"])
    wall = time.perf_counter() - start
    trainer, dm = fitted.trainer, fitted.datamodule
    epochs = dm.epochs_per_task or 1
    images = sum(len(dm.task_dataset(t, "train")) for t in range(dm.num_tasks)) * epochs
    durations = dict(trainer.profiler.recorded_durations)
    train_time = sum(sum(v) for k, v in durations.items() if k == "run_training_batch" or
                     k.endswith("train_dataloader_next"))
    dm.set_task(0)
    after = bare_rate(fitted.model, dm.train_dataloader(), dm.num_classes)
    after_cl = bare_rate(fitted.model, dm.train_dataloader(), dm.num_classes, channels_last=True)

    # The reference is the faster layout of the bare part (each the median of its passes before and after).
    by_layout = {"contiguous": statistics.median(before + after),
                 "channels_last": statistics.median(before_cl + after_cl)}
    layout = max(by_layout, key=by_layout.__getitem__)
    bare = by_layout[layout]
    fit_train = images / train_time
    fit_all = images / wall
    results = {
        "fit_vs_bare_training_rate_ratio": round(fit_train / bare, 3),
        "fit_overall_vs_bare_rate_ratio": round(fit_all / bare, 3),
        "fit_vs_contiguous_bare_training_rate_ratio": round(fit_train / by_layout["contiguous"], 3),
        "fit_training_images_per_second": round(fit_train, 1),
        "fit_overall_images_per_second": round(fit_all, 1),
        "bare_images_per_second": round(bare, 1),
        "bare_layout": layout,
        "bare_images_per_second_by_layout": {k: round(v, 1) for k, v in by_layout.items()},
        "bare_images_per_second_before_and_after": [round(r, 1) for r in before + after],
        "bare_channels_last_images_per_second_before_and_after": [round(r, 1) for r in before_cl + after_cl],
        "training_images": images,
        "fit_wall_s": round(wall, 1),
        "time_in_training_batches_s": round(train_time, 1),
        "where_the_time_goes_s": breakdown(durations),
        "top_actions_s": dict(sorted(((k, round(sum(v), 2)) for k, v in durations.items()),
                                     key=lambda kv: -kv[1])[:15]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join([sys.executable, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"fit {fit_train:.0f} img/s in training batches ({fit_all:.0f} img/s overall), bare top part "
          f"{bare:.0f} img/s ({layout}): ratio {fit_train / bare:.3f} ({fit_all / bare:.3f} overall)")
    for group, seconds in results["where_the_time_goes_s"].items():
        print(f"  {group:<72} {seconds:8.1f} s")
    return results


if __name__ == "__main__":
    main()

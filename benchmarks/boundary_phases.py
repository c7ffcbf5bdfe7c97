"""The phases of one task boundary's post-merge pass, timed one by one on the CPU protocol (issue 12).

`benchmarks/fit_rate.py` times a boundary as a whole (profiler actions); this splits the statistics pass and the
evaluation into their parts on task 0 of a config: the statistics pass's forward, the same forward with the
input-subspace moments collected, the head's ``update`` over the pass's features, its ``fit`` (with the choice of
``lambda``, as at tasks 1, 2, 4, 8, ...), the subspace's ``update``, one evaluation pass over task 0's test images,
and, for the ridge head, one Cholesky factorisation of its Gram matrix (the cost of one ``lambda`` solved
directly). The adapter is given random ``B`` factors and merged first, so one slot is occupied as in a sequence.

    python benchmarks/boundary_phases.py --config configs/tiny_imagenet_lite0_cpu.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls of ``fn`` and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_imagenet_lite0_cpu.yaml")
    parser.add_argument("--out", type=Path, default=RESULTS / "boundary_phases_cpu.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="after --: more ham-lightning arguments")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from ham_lightning.cli import cli

    built = cli(["--config", args.config, *args.extra, "--runs_dir=runs/boundary_phases", "--run_name=probe",
                 "--trainer.enable_progress_bar=false"], run=False)
    model, data = built.model, built.datamodule
    data.setup("fit")
    data.set_task(0)
    for task_head in (model.head, model.loss_head):  # what the callback does at a task's start
        if task_head is not None:
            task_head.start_task(list(data.task_classes(0)))
    with torch.no_grad():
        for layer in model.ham.layers.values():
            layer.lora_B.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
    model.ham.end_task()
    train = list(data.train_dataloader())
    tests = data.test_dataloader()
    test = list(tests[0] if isinstance(tests, (list, tuple)) else tests)
    model.eval()
    head, subspace = model.head, model.subspace
    phases: dict[str, float] = {}
    with torch.no_grad():
        phases["forward"], _ = timed(lambda: [model.features(x) for x, _ in train], args.repeats)
        if subspace is not None:
            def with_moments() -> list[torch.Tensor]:
                with subspace.collect():
                    return [model.features(x) for x, _ in train]

            phases["forward with input moments"], _ = timed(with_moments, 1)  # moments accumulate: once
        features = [(model.features(x).float(), y) for x, y in train]
        if hasattr(head, "update"):
            phases["head update"], _ = timed(lambda: [head.update(f, y) for f, y in features], 1)
            phases["head fit (lambda chosen)"], _ = timed(head.fit, 1)
        if subspace is not None:
            phases["subspace update"], _ = timed(subspace.update, args.repeats)
        phases["evaluation of task 0"], _ = timed(lambda: [model(x) for x, _ in test], args.repeats)
        gram = getattr(head, "gram", None)
        if gram is not None:
            shifted = gram + float(head.lam) * torch.eye(gram.shape[0], dtype=gram.dtype)  # the chosen lambda
            phases["one Cholesky of the ridge Gram"], _ = timed(lambda: torch.linalg.cholesky_ex(shifted),
                                                               args.repeats)
    images = {"train": sum(len(y) for _, y in train), "test": sum(len(y) for _, y in test)}
    results = {
        "seconds": {k: round(v, 3) for k, v in phases.items()},
        "images": images,
        "evaluation_images_per_second": round(images["test"] / phases["evaluation of task 0"], 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join([sys.executable, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    for phase, seconds in results["seconds"].items():
        print(f"  {phase:<40} {seconds:7.3f} s")
    return results


if __name__ == "__main__":
    main()

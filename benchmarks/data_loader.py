"""Is the data loader the bottleneck? Loader images/s of `ClassIncrementalDataModule` against the model's step rate.

    python benchmarks/data_loader.py --root ../shared/data/tiny-imagenet-200.zip      # Tiny-ImageNet, 64 px
    python benchmarks/data_loader.py                                                  # digits (built in), 32 px
    python benchmarks/data_loader.py --root ... --num-workers 0 1 2 --batches 30 --model-steps 5

Measured, in this order:

* ``setup``: building the scenario and ``setup()``: for Tiny-ImageNet, reading every JPEG (from the zip) and
  decoding it once into a uint8 array; then the same from the ``.npy`` decode cache written by the first build.
* ``train loader``: images/s of task 0's train loader (random-resized crop, flip, normalise), for every
  ``--num-workers`` value; the first batch (worker start-up) is left out of the timing.
* ``test loader``: images/s of task 0's test loader (resize, centre crop, normalise), in the main process.
* ``model step``: images/s of a training step of a timm model created with ``pretrained=False`` (forward,
  cross-entropy, backward, SGD step) on a real batch from the loader, same batch size, on the CPU; the median
  of ``--model-steps`` timed steps after one warm-up step (robust to a shared, noisy machine).

The loader keeps up when its images/s are above the model's. A Markdown table goes to stdout and the figures,
with the command and the machine, to ``benchmarks/results/data_loader_cpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ham_lightning.data import ClassIncrementalDataModule
from ham_lightning.data.image_store import usable_cpus

RESULTS = Path(__file__).resolve().parent / "results" / "data_loader_cpu.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="Tiny-ImageNet zip or folder (default: the digits data set)")
    parser.add_argument("--dataset", default=None, help="data set name (default: tiny_imagenet with --root, "
                                                        "else digits)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: 64 Tiny-ImageNet, 32 digits)")
    parser.add_argument("--num-tasks", type=int, default=None, help="tasks (default: 10, digits 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 2], help="loader workers to compare")
    parser.add_argument("--batches", type=int, default=20, help="timed batches of each loader")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model (random weights)")
    parser.add_argument("--model-steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: usable cores)")
    parser.add_argument("--cache-dir", default=None, help="decode cache (default: a temporary folder, removed)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON output")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, cache_dir: str, num_workers: int = 0) -> ClassIncrementalDataModule:
    return ClassIncrementalDataModule(
        args.dataset, root=args.root, num_tasks=args.num_tasks, image_size=args.image_size,
        batch_size=args.batch_size, num_workers=num_workers, cache_dir=cache_dir, pin_memory=False,
    )


def timed_setup(args: argparse.Namespace, cache_dir: str) -> tuple[ClassIncrementalDataModule, float]:
    start = time.perf_counter()
    dm = build(args, cache_dir)
    dm.setup("fit")
    return dm, time.perf_counter() - start


def batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``loader`` epoch after epoch (a task may hold fewer batches than asked for)."""
    while True:
        yield from loader


def loader_rate(loader: DataLoader, count: int) -> dict[str, float]:
    """Images/s over ``count`` batches after a first, untimed one (worker start-up, first-touch costs)."""
    stream = batches(loader)
    first = time.perf_counter()
    next(stream)
    start = time.perf_counter()
    images = sum(len(next(stream)[1]) for _ in range(count))
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "first_batch_s": start - first}


def model_rate(model_name: str, batch: tuple[torch.Tensor, torch.Tensor], num_classes: int, steps: int
               ) -> dict[str, Any]:
    """Images/s of forward + backward + SGD step of a randomly initialised timm model on ``batch``."""
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up: allocations, first-call kernels
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"model": model_name, "parameters": sum(p.numel() for p in model.parameters()),
            "steps": steps, "step_seconds": times, "median_step_s": median, "images_per_s": len(y) / median}


def markdown(results: dict[str, Any]) -> str:
    model = results["model_step"]["images_per_s"]
    rows = ["| what | images/s | vs. model step |", "|---|---:|---:|"]
    for entry in results["train_loader"]:
        rows.append(f"| train loader, task 0, num_workers={entry['num_workers']} | {entry['images_per_s']:,.0f} | "
                    f"{entry['images_per_s'] / model:.1f}x |")
    test = results["test_loader"]
    rows.append(f"| test loader, task 0, num_workers=0 | {test['images_per_s']:,.0f} | "
                f"{test['images_per_s'] / model:.1f}x |")
    rows.append(f"| model step ({results['model_step']['model']}, fwd+bwd+SGD, batch {results['batch_size']}) | "
                f"{model:,.1f} | 1.0x |")
    setup = results["setup"]
    lines = [
        f"**{results['dataset']}**, {results['image_size']} px, {results['num_tasks']} tasks; "
        f"{setup['train_images']:,} train + {setup['test_images']:,} test images",
        "",
        f"setup (read + decode once): {setup['first_s']:.1f} s "
        f"({(setup['train_images'] + setup['test_images']) / setup['first_s']:,.0f} images/s); "
        f"from the .npy cache: {setup['cached_s']:.1f} s",
        "",
        *rows,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.dataset = args.dataset or ("tiny_imagenet" if args.root else "digits")
    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="ham-data-cache-") as tmp:
        cache_dir = args.cache_dir or tmp
        dm, first_s = timed_setup(args, cache_dir)
        _, cached_s = timed_setup(args, cache_dir)
        train_images = sum(len(dm.task_dataset(t, "train")) for t in range(dm.num_tasks))
        test_images = sum(len(dm.task_dataset(t, "test")) for t in range(dm.num_tasks))
        print(f"setup: {first_s:.1f} s first, {cached_s:.1f} s from the cache", file=sys.stderr)

        train = []
        for workers in args.num_workers:
            loader_dm = build(args, cache_dir, num_workers=workers)  # reads the decode cache
            loader_dm.setup("fit")
            rate = loader_rate(loader_dm.train_dataloader(), args.batches)
            train.append({"num_workers": workers, **rate})
            print(f"train loader, {workers} workers: {rate['images_per_s']:,.0f} images/s", file=sys.stderr)
            del loader_dm  # stops its persistent workers
        test = loader_rate(dm.test_dataloader()[0], min(args.batches, len(dm.test_dataloader()[0]) - 1) or 1)
        batch = next(iter(dm.train_dataloader()))
        model = model_rate(args.model, batch, dm.num_classes, args.model_steps)
        print(f"model step: {model['images_per_s']:,.1f} images/s", file=sys.stderr)

    results: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or
                                                                                            sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "usable_cpus": usable_cpus(), "os_cpu_count": os.cpu_count(), "torch_threads": threads,
                    "cuda": torch.cuda.is_available(), "torch": torch.__version__, "timm": timm.__version__},
        "dataset": args.dataset,
        "source": dm.hparams["source"],
        "image_size": dm.data_config.image_size,
        "num_tasks": dm.num_tasks,
        "batch_size": args.batch_size,
        "setup": {"first_s": first_s, "cached_s": cached_s, "train_images": train_images,
                  "test_images": test_images},
        "train_loader": train,
        "test_loader": {"num_workers": 0, **test},
        "model_step": model,
    }
    results["bottleneck"] = ("loader" if max(e["images_per_s"] for e in train) < model["images_per_s"]
                             else "model")
    table = markdown(results)
    results["markdown"] = table
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()

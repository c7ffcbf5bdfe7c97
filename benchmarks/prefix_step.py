"""Training step of the cached top part against the full backbone, same config, side by side (issue 10).

With a frozen prefix (``adapt_from``), a training step needs only the top part: the prefix's activations come
from the feature cache (`ham_lightning.data.feature_cache`). This times, in ONE run and interleaved (the order
alternates every repetition), the step (forward + backward + AdamW step on the trainable parameters) of

* ``full``: images through the whole backbone (``model(x)``), HAM adapters only at and above ``adapt_from``;
* ``cached``: the same model and adapters from cached activations (``split.top(h)``),

in two variants: ``ham`` (HAM adapters at and above the point, and the head, train) and ``head`` (the backbone
frozen, only the head trains: the full path then runs the backbone forward only), for ``tf_efficientnet_lite0`` (random init; the weights do not change the cost), 96 px, batch 64, HAM on
``conv_pw``, ``conv_pwl``, ``conv_head`` at and above the point (``HAMConfig.adapt_from``) and a trainable
200-class linear head, BatchNorm frozen. Per-repetition ratios (full / cached) are summarised by their median.

It also times what feeds one batch to each path, outside the step: the train transform of 64 uint8 64 px images
to 96 px (pad-crop + flip, as the Tiny-ImageNet config) against gathering 64 random float16 rows of a cache
array into a float32 tensor.

    python benchmarks/prefix_step.py --threads 1          # both points, CPU (one thread: see docs/data.md)
    python benchmarks/prefix_step.py --points blocks.6    # one point

Writes ``benchmarks/results/prefix_step_<device>.json`` with ``cached_vs_full_step_ratio`` (full / cached at the
first point and variant), ``ratios`` (every point and variant), per-point medians, machine, versions, command.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ham_lightning import HAMConfig, inject
from ham_lightning.core.norm import freeze_norm_layers
from ham_lightning.core.prefix import split_model
from ham_lightning.data.transforms import build_transform, resolve_data_config

TARGETS = ["conv_pw", "conv_pwl", "conv_head"]


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_point(point: str, variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = timm.create_model(args.backbone, pretrained=False, num_classes=0).to(device)
    if variant == "ham":
        layers = len(inject(model, HAMConfig(target_modules=TARGETS, adapt_from=point, rank=args.rank)).layers)
    else:  # a frozen backbone, BatchNorm in eval mode, only the head trains
        model.requires_grad_(False)
        freeze_norm_layers(model)
        layers = 0
    split = split_model(model, point)
    head = nn.Linear(model.num_features, args.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
    h = split.prefix(x).contiguous()  # what the cache serves (as float32, after the float16 round trip)
    h = h.half().float()

    def step(features: Callable[[], torch.Tensor]) -> None:
        loss = F.cross_entropy(head(features()), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    paths: dict[str, Callable[[], None]] = {
        "full": lambda: step(lambda: model(x)),
        "cached": lambda: step(lambda: split.top(h)),
    }
    for _ in range(args.warmup):
        for fn in paths.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    ratios = []
    for rep in range(args.repeats):
        order = list(paths) if rep % 2 == 0 else list(paths)[::-1]
        rep_times = {name: timed(paths[name], device) for name in order}
        for name, seconds in rep_times.items():
            times[name].append(seconds)
        ratios.append(rep_times["full"] / rep_times["cached"])
    full, cached = statistics.median(times["full"]), statistics.median(times["cached"])
    return {
        "adapt_from": point,
        "variant": variant,
        "ham_layers": layers,
        "trainable_parameters": sum(p.numel() for p in params),
        "prefix_shape": list(h.shape[1:]),
        "cached_bytes_per_view_float16": int(h[0].numel() * 2),
        "full_step_seconds": round(full, 4),
        "cached_step_seconds": round(cached, 4),
        "full_images_per_second": round(args.batch_size / full, 1),
        "cached_images_per_second": round(args.batch_size / cached, 1),
        "cached_vs_full_step_ratio": round(statistics.median(ratios), 2),
        "ratio_per_repetition": [round(r, 2) for r in ratios],
        "seconds_per_repetition": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
    }


def measure_batch_feeding(args: argparse.Namespace, prefix_shape: list[int]) -> dict[str, float]:
    """Seconds to build one batch for each path, outside the step (median of ``repeats``)."""
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (args.batch_size, 3, 64, 64), dtype=torch.uint8, generator=generator)
    config = resolve_data_config(args.backbone, image_size=args.image_size)
    transform = build_transform(config, train=True, augment=True, crop="pad", hflip=True)
    rows = 16_000
    cache = np.random.default_rng(0).standard_normal((rows, 4, *prefix_shape), dtype=np.float32).astype(np.float16)
    rng = np.random.default_rng(3)

    def transform_batch() -> None:
        torch.stack([transform(img) for img in images])

    def gather_batch() -> None:
        index, view = rng.integers(0, rows, args.batch_size), rng.integers(0, 4, args.batch_size)
        torch.stack([torch.from_numpy(np.array(cache[i, v], dtype=np.float32)) for i, v in zip(index, view)])

    out = {}
    for name, fn in (("images_transform_seconds", transform_batch), ("cache_gather_seconds", gather_batch)):
        fn()
        out[name] = round(statistics.median(timed(fn, torch.device("cpu")) for _ in range(args.repeats)), 5)
    return out


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", nargs="+", default=["blocks.6", "blocks.5"],
                        help="adapt_from points; the first gives the top-level ratio")
    parser.add_argument("--variants", nargs="+", choices=["ham", "head"], default=["ham", "head"],
                        help="ham: HAM adapters at and above the point + head; head: frozen backbone, trainable "
                             "head only; the first gives the top-level ratio")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    meta = machine(device)
    points: dict[str, dict[str, Any]] = {}
    for point in args.points:
        for variant in args.variants:
            r = measure_point(point, variant, args, device)
            points.setdefault(point, {})[variant] = r
            print(f"{point} {variant}: full {r['full_step_seconds']} s, cached {r['cached_step_seconds']} s per step "
                  f"of {args.batch_size}: {r['cached_vs_full_step_ratio']}x", flush=True)
    first = points[args.points[0]][args.variants[0]]
    result = {
        "cached_vs_full_step_ratio": first["cached_vs_full_step_ratio"],
        "adapt_from": args.points[0],
        "variant": args.variants[0],
        "ratios": {p: {v: r["cached_vs_full_step_ratio"] for v, r in vs.items()} for p, vs in points.items()},
        "points": points,
        "batch_feeding": measure_batch_feeding(args, first["prefix_shape"]),
        "config": {"backbone": args.backbone, "weights": "random init", "image_size": args.image_size,
                   "batch_size": args.batch_size, "target_modules": TARGETS, "rank": args.rank,
                   "num_classes": args.num_classes, "optimizer": "AdamW", "repeats": args.repeats,
                   "warmup": args.warmup},
        "machine": meta,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "numpy": np.__version__},
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/prefix_step.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out = args.out or Path(__file__).parent / "results" / f"prefix_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cached_vs_full_step_ratio ({args.points[0]}): {result['cached_vs_full_step_ratio']} -> {out}")
    return result


if __name__ == "__main__":
    main()

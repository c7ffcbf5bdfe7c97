"""One configuration of the CPU protocol through the Python API, with feature drift: ablations of HAM's levers.

Runs `HAMModule` + `ClassIncrementalDataModule(prefix_cache=...)` + `HierarchicalMergeCallback` + `FeatureDrift`
on the settings of ``configs/tiny_imagenet_lite0_cpu.yaml`` (Tiny-ImageNet zip, Lite0 real weights, 96 px,
blocks.6 prefix cache with 4 views, 5 epochs per task, Adam 1e-3, head lr 3e-3, seed 1993), with the overrides
given as JSON, and writes the results (accuracy matrix, metrics, groups, drift, wall time, arguments) to
``--out/<name>.json``. It prints one line. Example::

    python benchmarks/ablate.py ham_ridge_protect_T10 '{"ham": {"protect_inputs": 0.95}}'
    python benchmarks/ablate.py ridge_frozen_T10 '{"adapt": false, "epochs": 1}'
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, out: Path, num_tasks: int = 10, epochs: int = 5, point: str = "blocks.6", head: str = "ridge",
        adapt: bool = True, lr: float = 1e-3, head_lr: float = 3e-3, ham: dict[str, Any] | None = None,
        train_head: str = "linear", batch: int = 64, head_kwargs: dict[str, Any] | None = None,
        cache_dir: str | None = None) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    import ham_lightning as hl
    from ham_lightning.lightning.drift import FeatureDrift

    pl.seed_everything(1993, workers=True)
    cache = {"backbone": "tf_efficientnet_lite0", "adapt_from": point, "views": 4, "cache_dir": cache_dir,
             "progress": False}
    data = hl.ClassIncrementalDataModule(
        dataset="tiny_imagenet", root=str(ROOT.parent / "shared" / "data" / "tiny-imagenet-200.zip"),
        num_tasks=num_tasks, class_order="seed", seed=1993, image_size=96, batch_size=batch, epochs_per_task=epochs,
        train_crop="pad", hflip=True, prefix_cache=cache)
    config = {"target_modules": ["conv_pw", "conv_pwl", "conv_head"], "adapt_from": point, "rank": 8,
              "max_groups": 4, "group_rank": 32, "prune": "magnitude", "density": 0.5, **(ham or {})}
    model = hl.HAMModule("tf_efficientnet_lite0", num_classes=200, pretrained=True, ham=config, adapt=adapt,
                         head=head, train_head=train_head, head_kwargs=head_kwargs,
                         optimizer=lambda p: torch.optim.Adam(p, lr=lr), head_lr=head_lr)
    merge, drift = hl.HierarchicalMergeCallback(), FeatureDrift(probe_size=30)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=num_tasks * epochs, reload_dataloaders_every_n_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[merge, drift])
    start = time.time()
    trainer.fit(model, data)
    results = {**merge.results(), "drift": drift.results(), "wall_s": time.time() - start,
               "args": {"name": name, "num_tasks": num_tasks, "epochs": epochs, "point": point, "head": head,
                        "adapt": adapt, "lr": lr, "head_lr": head_lr, "ham": config, "train_head": train_head,
                        "head_kwargs": head_kwargs, "batch": batch},
               "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(f"{name}: last {results['last_accuracy']:.2f} avg {results['average_incremental_accuracy']:.2f} "
          f"forgetting {results['forgetting']:.2f} old-task feature cosine "
          f"{results['drift']['mean_cosine_old_tasks'][-1]} wall {results['wall_s']:.0f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON of run()'s keyword arguments")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tiny_imagenet_lite0_cpu/ablations")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 shared cores)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    run(args.name, args.out, **json.loads(args.overrides))


if __name__ == "__main__":
    main()

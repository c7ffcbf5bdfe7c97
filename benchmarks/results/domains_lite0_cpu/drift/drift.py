"""Experiment (not an option of the package): drift compensation of the ridge statistics, exemplar-free.

Measured (`../replay/`): with weaker protection HAM's final features are far better than its head shows (50 tasks,
held-out: protection 0.5 scores 62.13 as trained and 68.18 with statistics refitted on every image), because the
old classes' statistics were summed under older deltas. This keeps only each class's mean prefix activation (the
input of the adapted part: frozen, so it never drifts) and estimates how a merge moves each old class of the slot:

* at a task's first step (its adapter still zero, so the model is the slot as before the merge) every batch row is
  translated to each old class of the planned slot (FeTrIL in the prefix's space: ``x - mean(own class in the
  batch) + mean(old class)``, ``$DRIFT_SAMPLES`` rows a class) and passed through the top part;
* after the merge, before the statistics pass, the same rows pass through the merged slot, and the slot's ridge
  sums move as if every old sample of the class had moved by the rows' mean shift ``d`` in the head's expanded
  space (``$DRIFT_MODE=shift``, SDC-style): ``gram += t d^T + d t^T + n d d^T``, ``targets[:, c] += n d``, with
  ``t`` the class's column of ``targets`` and ``n`` its count (the held-out sums alike, by the hold-out share).
  ``$DRIFT_MODE=moments`` adds the rows' second-moment difference instead, ``w (H_new^T H_new - H_old^T
  H_old)``: measured first, it is not kept positive definite and the held-out errors that choose ``lam`` went
  negative (corrected in the held-out sums too) or, as this code does it (the held-out sums left), the accuracy
  jumped by 10-20 points between tasks.

Runs `benchmarks/$DRIFT_SCRIPT.py`'s main (``stale_statistics`` by default) in this process:

    DRIFT_SAMPLES=32 PYTHONPATH=. python benchmarks/results/domains_lite0_cpu/drift/drift.py \\
        --config configs/domains_lite0_cpu.yaml --num_tasks 50 --validation 0.2 --out <json> \\
        -- --model.ham.protect_inputs=0.5
"""

from __future__ import annotations

import importlib
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ham_lightning.core.heads import RidgeHead
from ham_lightning.core.prefix import PREFIX_KEY
from ham_lightning.lightning.callback import HierarchicalMergeCallback
from ham_lightning.lightning.module import HAMModule

SAMPLES = int(os.environ.get("DRIFT_SAMPLES", "32"))
MODE = os.environ.get("DRIFT_MODE", "shift")
_training_step = HAMModule.training_step
_statistics_pass = HierarchicalMergeCallback._statistics_pass
_update = RidgeHead.update


def update(self: RidgeHead, features: torch.Tensor, labels: torch.Tensor) -> None:
    """The ridge update, counting each class's rows (the weight of its drift)."""
    self.__dict__.setdefault("_class_rows", Counter()).update(labels.tolist())
    _update(self, features, labels)


@torch.no_grad()
def _top(module: HAMModule, x: torch.Tensor, slot: int) -> torch.Tensor:
    """Features of prefix rows through the top part with ``slot``'s delta (eval mode, planned route)."""
    router = module.ham.router  # type: ignore[union-attr]
    was_training, before = module.training, int(router.planned)
    module.eval()
    router.planned.fill_(slot)
    try:
        with router.planned_routes():
            return torch.cat([module.features({PREFIX_KEY: part}) for part in x.split(512)])
    finally:
        router.planned.fill_(before)
        module.train(was_training)


def training_step(self: HAMModule, batch: tuple[Any, torch.Tensor], batch_idx: int) -> Any:
    x, y = batch
    h = x[PREFIX_KEY].detach()
    flat = h.flatten(1).double().cpu()
    sums: dict[int, torch.Tensor] = self.__dict__.setdefault("_prefix_sum", {})
    counts: Counter = self.__dict__.setdefault("_prefix_count", Counter())
    labels = y.cpu()
    if self.__dict__.get("_drift_task") != self.task:  # the task's first step: the slot as before the merge
        self.__dict__["_drift_task"] = self.task
        self.__dict__["_drift_bank"] = None
        slot = int(self.ham.router.planned)  # type: ignore[union-attr]
        current = self.head.current.cpu()
        old = [c for c in sums if not bool(current[c]) and int(self.head.class_slot[c]) == slot]
        if old and slot >= 0:
            own = {c: flat[labels == c].mean(0) for c in labels.unique().tolist()}
            rows = torch.arange(SAMPLES) % flat.shape[0]
            base = flat[rows] - torch.stack([own[int(c)] for c in labels[rows]])
            moved = torch.cat([base + sums[c] / counts[c] for c in old]).to(h).reshape(-1, *h.shape[1:])
            self.__dict__["_drift_bank"] = (slot, old, moved, _top(self, moved, slot))
    for c in labels.unique().tolist():  # the current classes' mean prefix activation (kept for later tasks)
        part = flat[labels == c]
        sums[c] = sums.get(c, 0) + part.sum(0)
        counts[c] += part.shape[0]
    return _training_step(self, batch, batch_idx)


def statistics_pass(self: HierarchicalMergeCallback, trainer: Any, pl_module: HAMModule, collecting: Any = None) -> None:
    bank = pl_module.__dict__.get("_drift_bank")
    if bank is not None:
        slot, old, moved, before = bank
        head = pl_module.head.heads[slot]
        head._flush()
        after = _top(pl_module, moved, slot)
        hb, ha = head.expand(before.float()).double(), head.expand(after.float()).double()
        rows = head.__dict__.get("_class_rows", Counter())
        drift = []
        share = float(head.held_count / head.count.clamp_min(1))
        for i, c in enumerate(old):
            part = slice(i * SAMPLES, (i + 1) * SAMPLES)
            n = float(rows[c])
            if MODE == "moments":  # second moments of the rows under both models: not kept PSD (see above)
                w = n / SAMPLES
                head.gram += w * (ha[part].T @ ha[part] - hb[part].T @ hb[part])
                head.targets[:, c] += w * (ha[part] - hb[part]).sum(0)
            else:  # every old sample of the class shifted by the rows' mean shift: the sums of shifted samples
                shift = (ha[part] - hb[part]).mean(0)
                for gram, targets, count in ((head.gram, head.targets, n), (head.held_gram, head.held_targets,
                                                                             share * n)):
                    if not gram.numel():
                        continue
                    t = targets[:, c].clone()
                    gram += torch.outer(t, shift) + torch.outer(shift, t) + count * torch.outer(shift, shift)
                    targets[:, c] += count * shift
            drift.append(float((after[part] - before[part]).norm(dim=1).mean() / before[part].norm(dim=1).mean()))
        print(f"[drift] task {pl_module.task} slot {slot}: {len(old)} old classes moved by "
              f"{sum(drift) / len(drift):.4f} of their features' norm (mean)", flush=True)
        pl_module.__dict__["_drift_bank"] = None
    _statistics_pass(self, trainer, pl_module, collecting)


if __name__ == "__main__":
    RidgeHead.update = update  # type: ignore[method-assign]
    HAMModule.training_step = training_step  # type: ignore[method-assign]
    HierarchicalMergeCallback._statistics_pass = statistics_pass  # type: ignore[method-assign]
    sys.path.insert(0, str(Path("benchmarks").resolve()))
    importlib.import_module(os.environ.get("DRIFT_SCRIPT", "stale_statistics")).main(sys.argv[1:])

"""Experiment (not a benchmark, not an option of the package): a small memory of real old samples in the adapters'
loss, to test the cause the measurements name for the rest of issue 22's gap (each adapter never sees the classes
it will be compared with). Not exemplar-free, so not a candidate for the issue's comparison; a diagnosis.

The memory keeps ``$REPLAY_PER_CLASS`` cached prefix activations (one augmented view each, the first the loader
gives) of every class once its task is done; each training batch adds ``$REPLAY_BATCH`` of them, drawn uniformly
from the old classes of the slot the task joins (``route_head``: the classes its head compares), with their labels,
through the adapted top part and the train head (its old rows trained: run with ``--model.freeze_old_rows=false``).
The statistics head is untouched (fitted as in the config). Runs `benchmarks/ablate.py` in this process (or
``$REPLAY_SCRIPT``'s main, e.g. ``stale_statistics`` or ``head_headroom``, with that script's arguments):

    REPLAY_PER_CLASS=5 REPLAY_BATCH=64 PYTHONPATH=. python benchmarks/results/domains_lite0_cpu/replay/replay.py \\
        --config configs/domains_lite0_cpu.yaml --num_tasks 50 --validation 0.2 --only default --out <dir> \\
        -- --model.freeze_old_rows=false
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ham_lightning.core.prefix import PREFIX_KEY
from ham_lightning.lightning.module import HAMModule

PER_CLASS = int(os.environ.get("REPLAY_PER_CLASS", "5"))
BATCH = int(os.environ.get("REPLAY_BATCH", "64"))


def training_step(self: HAMModule, batch: tuple[Any, torch.Tensor], batch_idx: int) -> torch.Tensor:
    x, y = batch
    head = self.loss_head or self.head
    h = x[PREFIX_KEY]
    memory: dict[int, list[torch.Tensor]] = self.__dict__.setdefault("_replay_memory", {})
    for sample, label in zip(h.detach().cpu(), y.cpu().tolist(), strict=True):  # the current task's, kept
        kept = memory.setdefault(int(label), [])
        if len(kept) < PER_CLASS:
            kept.append(sample.clone())
    pool = torch.zeros_like(head.current.cpu())
    old = [c for c in memory if not bool(head.current[c])]
    if old:
        pool[old] = True
    if self.route_head:
        pool &= self.head.class_slot.cpu() == int(self.ham.router.planned)  # type: ignore[union-attr]
    classes = torch.nonzero(pool).flatten()
    if classes.numel() and BATCH:
        generator = torch.Generator().manual_seed(1_000_003 * self.task + self.global_step)
        labels = classes[torch.randint(len(classes), (BATCH,), generator=generator)]
        picks = torch.randint(PER_CLASS, (BATCH,), generator=generator)
        drawn = torch.stack([memory[int(c)][int(i) % len(memory[int(c)])] for c, i in zip(labels, picks)]).to(h)
        features = self.features({PREFIX_KEY: torch.cat([h, drawn])})
        y = torch.cat([y, labels.to(y.device)])
        logits = head(features).masked_fill(~(pool.to(features.device) | head.current), float("-inf"))
    else:
        logits = head.train_logits(head(self.features(x)))
    loss = F.cross_entropy(logits.float(), y)
    self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
    return loss


if __name__ == "__main__":
    HAMModule.training_step = training_step  # type: ignore[method-assign]
    sys.path.insert(0, str(Path("benchmarks").resolve()))
    importlib.import_module(os.environ.get("REPLAY_SCRIPT", "ablate")).main(sys.argv[1:])

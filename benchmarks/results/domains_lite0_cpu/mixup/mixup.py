"""Experiment (not a benchmark): mixup of the cached prefix activations within each training batch, in the
adapters' loss only (``lam ~ Beta(alpha, alpha)``, alpha from ``$MIXUP_ALPHA``). Runs `benchmarks/ablate.py` in
this process with `HAMModule.training_step` replaced:

    MIXUP_ALPHA=0.4 PYTHONPATH=. python benchmarks/results/domains_lite0_cpu/mixup/mixup.py \\
        --config configs/domains_lite0_cpu.yaml --num_tasks 10 --validation 0.2 --only default --out <dir>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ham_lightning.core.prefix import PREFIX_KEY
from ham_lightning.lightning.module import HAMModule

ALPHA = float(os.environ.get("MIXUP_ALPHA", "0.4"))


def training_step(self: HAMModule, batch: tuple[Any, torch.Tensor], batch_idx: int) -> torch.Tensor:
    x, y = batch
    head = self.loss_head or self.head
    h = x[PREFIX_KEY]
    generator = torch.Generator().manual_seed(1_000_003 * self.task + self.global_step)
    lam = float(torch.distributions.Beta(ALPHA, ALPHA).sample()) if ALPHA > 0 else 1.0
    perm = torch.randperm(h.shape[0], generator=generator).to(h.device)
    logits = head.train_logits(head(self.features({PREFIX_KEY: lam * h + (1 - lam) * h[perm]}))).float()
    loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
    return loss


if __name__ == "__main__":
    HAMModule.training_step = training_step  # type: ignore[method-assign]
    sys.path.insert(0, str(Path("benchmarks").resolve()))
    import ablate

    ablate.main(sys.argv[1:])

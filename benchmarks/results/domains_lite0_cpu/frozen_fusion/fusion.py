"""Experiment (not a benchmark): a second statistics head on the frozen backbone's features, its class
probabilities mixed with the adapted head's at inference (late fusion; the frozen-features concatenation of
``../frozen_concat`` diluted the ridge's expansion, this keeps each head's own). The frozen head is a copy of the
model's head (a ridge head per routed slot with ``route_head``), fed by the same statistics pass and routed by the
same slots; the adapters still train through the train head on the adapted features alone. ``FUSION_W`` (0-1) is
the frozen head's weight, ``FUSION_MODE`` ``prob`` (mixture of probabilities) or ``logit`` (weighted sum of the
calibrated scores). Runs `benchmarks/ablate.py` in this process with `HAMModule` patched:

    FUSION_W=0.3 PYTHONPATH=. python benchmarks/results/domains_lite0_cpu/frozen_fusion/fusion.py --config \\
        configs/domains_lite0_cpu.yaml --num_tasks 10 --validation 0.2 --only default --out <dir>
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ham_lightning.lightning.module import HAMModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "frozen_concat"))
from concat import frozen_features  # noqa: E402  (the frozen backbone's features, built once per model)

W = float(os.environ.get("FUSION_W", "0.3"))
MODE = os.environ.get("FUSION_MODE", "prob")
init, adapted_features = HAMModule.__init__, HAMModule.features


def __init__(self: HAMModule, *args: Any, **kwargs: Any) -> None:
    init(self, *args, **kwargs)
    self.frozen_head = copy.deepcopy(self.head)  # driven by the sequence like every top-level head


def forward(self: HAMModule, x: Any) -> torch.Tensor:
    f = adapted_features(self, x)
    g = frozen_features(self, x, f)
    if self.route_head:
        slots = self._slots(f)
        a, b = self.head(f, slots), self.frozen_head(g, slots)
    else:
        a, b = self.head(f), self.frozen_head(g)
        a, b = a / self.head.temperature.to(a), b / self.frozen_head.temperature.to(b)
    a, b = self.head.eval_logits(a), self.frozen_head.eval_logits(b)  # softmax over the classes seen only
    if MODE == "logit":
        return (1 - W) * a + W * b
    mix = (1 - W) * torch.softmax(a.float(), -1) + W * torch.softmax(b.float(), -1)
    return mix.clamp_min(1e-30).log().masked_fill(torch.isinf(a), float("-inf")).to(a)


if __name__ == "__main__":
    HAMModule.__init__ = __init__  # type: ignore[method-assign]
    HAMModule.forward = forward  # type: ignore[method-assign]
    sys.path.insert(0, str(Path("benchmarks").resolve()))
    import ablate

    ablate.main(sys.argv[1:])

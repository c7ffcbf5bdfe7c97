"""Experiment (not a benchmark): every head sees the adapted features concatenated with the frozen backbone's
(APER-style); with ``--adapted_train_head`` the train head sees the adapted half only (the frozen half zeroed in
training). Runs `benchmarks/ablate.py` in this process with `HAMModule.features` replaced; pass the heads' width
after ``--``:

    PYTHONPATH=. python benchmarks/results/domains_lite0_cpu/frozen_concat/concat.py --config \\
        configs/domains_lite0_cpu.yaml --num_tasks 10 --validation 0.2 --only default --out <dir> -- \\
        --model.feature_dim=2560
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ham_lightning.core.backbones import create_backbone
from ham_lightning.core.norm import freeze_norm_layers
from ham_lightning.core.prefix import split_model
from ham_lightning.lightning.module import HAMModule

ADAPTED_TRAIN_HEAD = "--adapted_train_head" in sys.argv
adapted = HAMModule.features


def frozen_features(self: HAMModule, x: Any, like: torch.Tensor) -> torch.Tensor:
    """The frozen backbone's features of ``x`` (its top part on cached prefix activations), as ``like``'s dtype."""
    frozen = self.__dict__.get("_frozen_split")
    if frozen is None:
        backbone = create_backbone(self.hparams.backbone, pretrained=self.hparams.pretrained).to(like.device).eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        freeze_norm_layers(backbone)
        frozen = split_model(backbone, self.ham_config.adapt_from)
        self.__dict__["_frozen_split"], self.__dict__["_frozen_backbone"] = frozen, backbone
    with torch.no_grad():
        g = frozen.top(x["prefix"]) if isinstance(x, Mapping) else self.__dict__["_frozen_backbone"](x)
    return g.to(like)


def features(self: HAMModule, x: Any) -> torch.Tensor:
    f = adapted(self, x)
    g = frozen_features(self, x, f)
    if ADAPTED_TRAIN_HEAD and self.training:
        g = torch.zeros_like(g)
    return torch.cat([f, g], 1)


if __name__ == "__main__":
    HAMModule.features = features  # type: ignore[method-assign]
    sys.path.insert(0, str(Path("benchmarks").resolve()))
    import ablate

    ablate.main([a for a in sys.argv[1:] if a != "--adapted_train_head"])

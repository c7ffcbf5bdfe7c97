"""`FeatureDrift`: how far each task's adapters move the features of earlier tasks' images.

After task ``i`` it takes the backbone features of a fixed probe set per seen task (the first ``probe_size`` test
images of task ``j``) and records ``drift[i][j]``: the mean cosine between the features of task ``j``'s probe now
and right after task ``j`` was learned (1.0: no drift). A head fitted on task ``j``'s features (``ridge``, ``ncm``,
a frozen linear row) is stale by exactly this much.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor
from typing_extensions import override


class FeatureDrift(Callback):
    """Cosine drift of old tasks' probe features, measured at every task boundary (needs a `ContinualEvaluation`).

    Args:
        probe_size: test images per task in the probe.
    """

    def __init__(self, probe_size: int = 64) -> None:
        self.probe_size = probe_size
        # features[j]: task j's probe features right after task j (float16 on CPU, probe_size x dim).
        self.reference: list[Tensor] = []
        # drift[i][j]: mean cosine after task i for task j <= i.
        self.drift: list[list[float]] = []

    @torch.no_grad()
    def _probe_features(self, pl_module: LightningModule, loader: Any) -> Tensor:
        feats, n = [], 0
        for x, _ in loader:
            x = move_data_to_device(x, pl_module.device)
            feats.append(pl_module.features(x).float().cpu())
            n += feats[-1].shape[0]
            if n >= self.probe_size:
                break
        return torch.cat(feats)[: self.probe_size]

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> list[float]:
        """Drift of every seen task now; the newest task's features become its reference."""
        loaders = trainer.datamodule.test_dataloader()
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        loaders = loaders[: len(self.drift) + 1]  # the datamodule may already serve the next task
        was_training = pl_module.training
        pl_module.eval()
        row = []
        for j, loader in enumerate(loaders):
            now = self._probe_features(pl_module, loader)
            if j >= len(self.reference):
                self.reference.append(now.half())
            row.append(float(F.cosine_similarity(now, self.reference[j].float(), dim=-1).mean()))
        pl_module.train(was_training)
        self.drift.append(row)
        return row

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._catch_up(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._catch_up(trainer, pl_module)

    def _catch_up(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from ham_lightning.lightning.sequence import ContinualEvaluation

        continual = next((c for c in trainer.callbacks if isinstance(c, ContinualEvaluation)), None)
        if continual is None:
            return
        done = len(continual.rows) if continual.evaluate else continual.current_task
        while len(self.drift) < done:  # a boundary passed in this epoch (the sequence's callback ran before us)
            row = self.measure(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics({"cl/feature_cosine_oldest": row[0], "cl/feature_cosine_mean": sum(row) / len(row),
                                    "cl/task": len(self.drift) - 1}, step=trainer.global_step)

    def results(self) -> dict[str, Any]:
        """``drift``: the cosine matrix; ``mean_old``: after each task, the mean over earlier tasks."""
        mean_old = [sum(r[:-1]) / (len(r) - 1) if len(r) > 1 else None for r in self.drift]
        return {"feature_cosine": self.drift, "mean_cosine_old_tasks": mean_old}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference": [r.clone() for r in self.reference], "drift": self.drift}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = list(state_dict["reference"])
        self.drift = [list(r) for r in state_dict["drift"]]

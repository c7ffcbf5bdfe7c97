"""`HAMModule`: a LightningModule holding a frozen backbone with HAM layers and an incremental linear head."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from ham_lightning.core.config import HAMConfig
from ham_lightning.core.controller import HAMController, inject
from ham_lightning.core.heads import HeadKind, IncrementalHead, LogitMask


class HAMModule(LightningModule):
    """Backbone (timm name or ``nn.Module``) + HAM layers + one linear head over every class of the scenario.

    Args:
        backbone: a timm model name (full weight tag, e.g. ``vit_base_patch16_224.augreg_in21k``) or a module
            returning pooled features.
        num_classes: classes of the whole scenario (the head is allocated up front).
        ham: the `HAMConfig` (targets, rank, groups, pruning...), or its fields as a dict.
        pretrained: load the backbone's pretrained weights (timm names only).
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``).
        feature_dim: feature size of a module backbone without timm's ``num_features``.
        head: ``linear`` (design.md's masked linear head) or ``cosine`` (normalised features and rows, times
            ``head_scale``: old and new tasks' logits on one scale).
        head_scale: the cosine head's logit scale.
        head_mask: train on the current task's logits only (``current``) or on all seen classes (``seen``).
        freeze_old_rows: freeze head rows of finished tasks.
        freeze_norm: keep BatchNorm layers in eval mode (frozen running statistics) while training.
        optimizer: optimizer factory (LightningCLI style); scalars get no weight decay.
        lr_scheduler: optional LR scheduler factory; it restarts with every task.
        head_lr: learning rate of the head, if different from the optimizer's.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_base_patch16_224.augreg_in21k",
        num_classes: int = 100,
        ham: HAMConfig | None = None,
        pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        feature_dim: int | None = None,
        head: HeadKind = "linear",
        head_scale: float = 16.0,
        head_mask: LogitMask = "current",
        freeze_old_rows: bool = True,
        freeze_norm: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        head_lr: float | None = None,
    ) -> None:
        super().__init__()
        ignore = ["ham", "optimizer", "lr_scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        self.ham_config = HAMConfig(**ham) if isinstance(ham, dict) else ham or HAMConfig()
        # A plain dict, so checkpoints load with torch.load(weights_only=True) and load_from_checkpoint works.
        self.hparams["ham"] = self.ham_config.to_dict()
        if isinstance(backbone, str):
            from ham_lightning.core.backbones import create_backbone

            backbone = create_backbone(backbone, pretrained=pretrained, **(backbone_kwargs or {}))
        self.backbone = backbone
        self.ham: HAMController = inject(self.backbone, self.ham_config)
        dim = feature_dim or getattr(self.backbone, "num_features", None)
        if not dim:
            raise ValueError(
                f"Cannot tell the feature size of {type(self.backbone).__name__}: pass feature_dim= (the size of "
                "the pooled features its forward returns)."
            )
        self.head = IncrementalHead(int(dim), num_classes, mask=head_mask, freeze_old_rows=freeze_old_rows, kind=head,
                                    scale=head_scale)
        self.freeze_norm = freeze_norm
        self.optimizer_factory, self.lr_scheduler_factory, self.head_lr = optimizer, lr_scheduler, head_lr
        self.task = 0
        if self.ham_config.method == "ncm":
            self._setup_ncm(int(dim), num_classes)

    # -- ncm baseline (HAMConfig.method="ncm") ------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        """The method this module runs (``HAMConfig.method``), recorded in results.json."""
        return self.ham_config.method

    @property
    def is_ncm(self) -> bool:
        return self.ham_config.method == "ncm"

    def _setup_ncm(self, dim: int, num_classes: int) -> None:
        """Frozen everything; class sums and counts of the frozen backbone's features; no optimizer."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.register_buffer("ncm_sum", torch.zeros(num_classes, dim))
        self.register_buffer("ncm_count", torch.zeros(num_classes))
        self.automatic_optimization = False

    def ncm_logits(self, features: Tensor) -> Tensor:
        """``head_scale * cos(feature, class mean)``; classes without a mean get ``-inf``."""
        means = self.ncm_sum / self.ncm_count.clamp_min(1.0)[:, None]
        logits = F.linear(F.normalize(features.float(), dim=-1), F.normalize(means, dim=-1)) * self.hparams.head_scale
        return logits.masked_fill(self.ncm_count == 0, float("-inf"))

    @torch.no_grad()
    def _ncm_accumulate(self, x: Tensor, y: Tensor) -> None:
        self.backbone.eval()  # features as at test time (no dropout / drop-path, frozen BatchNorm)
        features = self.backbone(x).float()
        self.train(True)
        self.ncm_sum.index_add_(0, y, features)
        self.ncm_count.index_add_(0, y, torch.ones_like(y, dtype=self.ncm_count.dtype))

    # -- model --------------------------------------------------------------------------------------------------
    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits over every class of the scenario (unmasked)."""
        if self.is_ncm:
            return self.ncm_logits(self.backbone(x))
        return self.head(self.backbone(x))

    @override
    def train(self, mode: bool = True) -> HAMModule:
        super().train(mode)
        if mode and self.freeze_norm:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- task hooks (called by ContinualEvaluation / HierarchicalMergeCallback) ----------------------------------
    def on_task_start(self, task: int, classes: Sequence[int]) -> None:
        self.task = task
        self.head.start_task(classes)

    def on_task_end(self, task: int) -> None:
        self.head.end_task()

    # -- steps --------------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.is_ncm:
            self._ncm_accumulate(x, y)
            return None  # type: ignore[return-value]
        logits = self.head.train_logits(self(x))
        loss = F.cross_entropy(logits.float(), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, dataloader_idx: int) -> None:
        x, y = batch
        preds = self.head.eval_logits(self(x).float()).argmax(dim=1)
        acc = (preds == y).float().mean()
        self.log(f"{stage}/acc_task_{dataloader_idx}", acc, batch_size=y.shape[0], add_dataloader_idx=False,
                 sync_dist=True)

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    # -- optimisation -------------------------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        if self.is_ncm:
            return None  # nothing trains: the class means are accumulated in training_step
        scalars = [p for p in self.ham.scalar_parameters() if p.requires_grad]
        scalar_ids = {id(p) for p in scalars}
        head = [p for p in self.head.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in scalar_ids | head_ids]
        groups: list[dict[str, Any]] = [{"params": rest}, {"params": head}]
        if self.head_lr is not None:
            groups[1]["lr"] = self.head_lr
        if scalars:
            groups.append({"params": scalars, "weight_decay": 0.0})
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # -- export -------------------------------------------------------------------------------------------------
    def export_peft(self, path: str | Path) -> Path:
        """Save the merged delta as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
        from ham_lightning.core.export import export_peft

        return export_peft(self.ham, path)

    def folded_backbone_state_dict(self) -> dict[str, Tensor]:
        """The backbone's state dict with the merged delta folded in: loads into a plain timm model."""
        from ham_lightning.core.export import folded_state_dict

        return folded_state_dict(self.ham)

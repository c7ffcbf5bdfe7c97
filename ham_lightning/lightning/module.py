"""`HAMModule`: a LightningModule holding a frozen backbone with HAM layers and a head over every class."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from typing_extensions import override

from ham_lightning.core.class_gaussians import ClassGaussians
from ham_lightning.core.config import HAMConfig
from ham_lightning.core.controller import HAMController, inject
from ham_lightning.core.grouped_head import GroupedHead
from ham_lightning.core.heads import HeadKind, IncrementalHead, LogitMask, create_head, is_statistics_head
from ham_lightning.core.norm import freeze_norm_layers
from ham_lightning.core.prefix import PREFIX_KEY, PrefixSplit, split_model
from ham_lightning.core.routing import Routes
from ham_lightning.core.subspace import InputSubspace
from ham_lightning.lightning.evaluation import TaskAccuracy
from ham_lightning.lightning.task_protocol import TaskAware


class HAMModule(LightningModule, TaskAware):
    """Backbone (timm name or ``nn.Module``) + HAM layers + one head over every class of the scenario.

    Nothing here is HAMModule's own: the sequence driver (`HierarchicalMergeCallback`) drives its heads, its
    controller's input protection and the statistics pass exactly as on a user's module with ``hl.inject``.

    Args:
        backbone: a timm model name (full weight tag, e.g. ``vit_base_patch16_224.augreg_in21k``) or a module
            returning pooled features.
        num_classes: classes of the whole scenario (the head is allocated up front).
        ham: the `HAMConfig` (targets, rank, groups, pruning, ``adapt_from``, ``freeze_norm``...), or its fields as a
            dict.
        pretrained: load the backbone's pretrained weights (timm names only).
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``).
        feature_dim: feature size of a module backbone without timm's ``num_features``.
        adapt: inject HAM adapters and train them; ``False`` keeps the backbone frozen and untouched (the
            training-free anchors: ``head="ncm"`` or ``"ridge"``).
        head: a name of the head registry (`ham_lightning.core.heads.list_heads`): ``linear`` (design.md's masked
            linear head), ``cosine`` (normalised features and rows times ``head_scale``), ``ncm`` (cosine nearest
            class mean) or ``ridge`` (random-projection ridge regression, RanPAC-style). ``ncm`` and ``ridge`` are
            fitted from class statistics at each task's end and cannot forget; with ``adapt=True`` the adapters
            train through a ``train_head`` used only for the loss.
        head_kwargs: extra arguments of the head (``ridge``: ``projection``, ``seed``, ``lambdas``, ``holdout``,
            ``lambda_holdout``).
        train_head: the head whose loss trains the adapters when ``head`` is a statistics head.
        head_scale: the cosine and NCM heads' logit scale.
        head_mask: train on the current task's logits only (``current``) or on all seen classes (``seen``).
        freeze_old_rows: freeze head rows of finished tasks.
        freeze_norm: alias of ``ham.freeze_norm`` (when given, it sets it).
        optimizer: optimizer factory (LightningCLI style); scalars get no weight decay.
        lr_scheduler: optional LR scheduler factory; it restarts with every task.
        head_lr: learning rate of the head, if different from the optimizer's.
        route_head: with ``ham.routing``, one statistics head per group slot (`GroupedHead`), each input scored by
            its routed slot's head among that slot's classes; ``False``: one head scores every seen class.
            No effect with ``adapt=False`` (nothing routes).
        pseudo_features: old-class features drawn per training batch from Gaussian class statistics
            (`ClassGaussians`, taken in each boundary's statistics pass, clipped to the features' range) and added
            to the loss with their labels, so the adapter learns its task's classes against earlier ones without
            their images (PASS-style; the classes of the slot the task joins with ``route_head``, else every
            earlier class). 0: none (measured to cost accuracy: docs/results.md).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_base_patch16_224.augreg_in21k",
        num_classes: int = 100,
        ham: HAMConfig | None = None,
        pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        feature_dim: int | None = None,
        adapt: bool = True,
        head: str = "linear",
        head_kwargs: dict[str, Any] | None = None,
        train_head: HeadKind = "linear",
        head_scale: float = 16.0,
        head_mask: LogitMask = "current",
        freeze_old_rows: bool = True,
        freeze_norm: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        head_lr: float | None = None,
        route_head: bool = False,
        pseudo_features: int = 0,
    ) -> None:
        super().__init__()
        ignore = ["ham", "optimizer", "lr_scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        config = HAMConfig(**ham) if isinstance(ham, dict) else ham or HAMConfig()
        if freeze_norm is not None:
            config = dataclasses.replace(config, freeze_norm=freeze_norm)
        self.ham_config = config
        # A plain dict, so checkpoints load with torch.load(weights_only=True) and load_from_checkpoint works.
        self.hparams["ham"] = self.ham_config.to_dict()
        if isinstance(backbone, str):
            from ham_lightning.core.backbones import create_backbone

            backbone = create_backbone(backbone, pretrained=pretrained, **(backbone_kwargs or {}))
        self.backbone = backbone
        self.adapt = adapt
        if adapt:
            self.ham: HAMController | None = inject(self.backbone, self.ham_config)
        else:
            self.ham = None
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            if self.ham_config.freeze_norm:
                freeze_norm_layers(self.backbone)
        self._split: PrefixSplit | None = None  # built on first use: see `prefix_split`
        dim = int(feature_dim or _feature_dim(self.backbone))

        def make_head() -> nn.Module:
            return create_head(head, dim, num_classes, mask=head_mask, freeze_old_rows=freeze_old_rows,
                               scale=head_scale, **(head_kwargs or {}))

        # A frozen backbone (adapt=False) routes nothing, so route_head has no effect there, as the rest of `ham`.
        route_head = route_head and adapt
        if route_head and not self.ham_config.routing:
            raise ValueError("route_head=True scores each input with its routed group's head, but this model does not "
                             "route (ham.routing=false): set ham.routing=true, or route_head=false.")
        self.head = (GroupedHead(dim, num_classes, self.ham_config.max_groups, make_head) if route_head
                     else make_head())
        # The head whose loss trains the adapters, when `head` is fitted from statistics.
        self.loss_head: IncrementalHead | None = None
        if is_statistics_head(self.head) and adapt:
            self.loss_head = IncrementalHead(dim, num_classes, mask=head_mask, freeze_old_rows=freeze_old_rows,
                                             kind=train_head, scale=head_scale)
        self.optimizer_factory, self.lr_scheduler_factory, self.head_lr = optimizer, lr_scheduler, head_lr
        self.route_head, self.pseudo_features = route_head, pseudo_features
        if pseudo_features < 0:
            raise ValueError(f"pseudo_features must be >= 0 (0: none), got {pseudo_features}")
        #: Class statistics the pseudo-features are drawn from (fed by the statistics pass through `forward`).
        self.class_statistics: ClassGaussians | None = None
        if pseudo_features and adapt:
            self.class_statistics = ClassGaussians(dim, num_classes, clip=True)
        elif pseudo_features:
            raise ValueError("pseudo_features trains adapters against earlier classes, but adapt=False trains no "
                             "adapter: set pseudo_features=0.")
        self.task = 0
        if not self.trains_anything:
            self.automatic_optimization = False

    # -- what runs ----------------------------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        """The method recorded in results.json: the merge rule, or the head of a frozen backbone."""
        return self.ham_config.method if self.adapt else self.hparams.head

    @property
    def trains_anything(self) -> bool:
        return self.adapt or not is_statistics_head(self.head)

    @override
    def setup(self, stage: str) -> None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        if stage == "fit" and not self.trains_anything and isinstance(strategy, DDPStrategy):
            # torch's DDP refuses a module without trainable parameters; with no gradient to reduce the module
            # stays unwrapped (as Lightning leaves it outside fitting) and the statistics are reduced instead.
            strategy.configure_ddp = lambda: None  # type: ignore[method-assign]

    @property
    def prefix_split(self) -> PrefixSplit:
        """The backbone cut at ``ham.adapt_from``; its ``top`` runs on cached prefix activations."""
        if self._split is None:
            if not self.ham_config.adapt_from:
                raise ValueError(
                    "The batch holds cached prefix activations ({'prefix': ...}) but ham.adapt_from is not set: "
                    "set it to the block the cache was taken at (e.g. 'blocks.5')."
                )
            self._split = split_model(self.backbone, self.ham_config.adapt_from)  # not a Module: no new state
        return self._split

    def features(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Pooled backbone features of images, or of cached prefix activations (``{"prefix": h}``)."""
        if isinstance(x, Mapping):
            return self.prefix_split.top(x[PREFIX_KEY])
        return self.backbone(x)

    @override
    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Logits over every class of the scenario (unmasked; with ``route_head``, each input's from its routed
        group's head, ``-inf`` on other groups' classes)."""
        features = self.features(x)
        if self.route_head:
            logits = self.head(features, self._slots(features))
        else:
            logits = self.head(features)
        if self.class_statistics is not None and not self.training:
            self.class_statistics(features)  # the statistics pass's hook reads the features here
        return logits

    def _slots(self, features: Tensor) -> Routes:
        """The routes of the forward just run (set by the routing hook; grouped by slot once, for the layers and
        the head alike), or no slot for any input when nothing routed."""
        routes = self.ham.last_routes  # type: ignore[union-attr]
        if routes is None:
            return Routes(torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device), ())
        return routes

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities of ``forward``'s logits among the classes seen so far: the head's calibrated ones
        where it has them (``ridge``: a temperature fitted on held-out training samples), else the softmax."""
        logits = self.head.eval_logits(logits)
        calibrated = getattr(self.head, "probabilities", None)
        return calibrated(logits) if calibrated is not None else torch.softmax(logits, dim=-1)

    @property
    def subspace(self) -> InputSubspace | None:
        """Earlier tasks' input subspaces kept off each new adapter (``ham.protect_inputs``; the controller's)."""
        return self.ham.subspace if self.ham is not None else None

    # -- the task sequence (TaskAware; heads and protection are driven by the callback) --------------------------
    @override
    def on_task_start(self, task: int, classes: Sequence[int]) -> None:
        self.task = task

    @override
    def on_fit_start(self) -> None:
        """A datamodule serving cached prefix activations must cut where the model does (``ham.adapt_from``)."""
        from ham_lightning.core.prefix import canonical_point

        cache = getattr(getattr(self.trainer, "datamodule", None), "prefix_cache", None)
        cut = getattr(cache, "adapt_from", None)
        own = self.ham_config.adapt_from
        if cut is not None and (own is None or canonical_point(own) != canonical_point(cut)):
            raise ValueError(
                f"The datamodule caches activations cut at {cut!r} (prefix_cache.adapt_from) but the model adapts "
                f"from {own!r} (ham.adapt_from): it would train on the wrong blocks. Set both to the same block "
                "(from the command line --model.ham.adapt_from alone sets both)."
            )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the controller owned the input subspace kept it under ``subspace.``."""
        state = checkpoint.get("state_dict", {})
        if self.ham is not None and any(k.startswith("subspace.") for k in state):
            where = f"backbone.{self.ham.state_name}.subspace."
            checkpoint["state_dict"] = {(where + k[len("subspace."):] if k.startswith("subspace.") else k): v
                                        for k, v in state.items()}

    # -- steps --------------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> Tensor | None:
        if not self.trains_anything:
            return None  # a frozen backbone with a statistics head: fitted at the task's end
        x, y = batch
        head = self.loss_head or self.head
        features = self.features(x)
        pseudo = self._pseudo_batch(head) if self.class_statistics is not None else None
        if pseudo is None:
            logits = head.train_logits(head(features))
        else:
            drawn, labels, allowed = pseudo
            features, y = torch.cat([features, drawn.to(features)]), torch.cat([y, labels.to(y.device)])
            logits = head(features).masked_fill(~(allowed.to(features.device) | head.current), float("-inf"))
        loss = F.cross_entropy(logits.float(), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    def _pseudo_batch(self, head: nn.Module) -> tuple[Tensor, Tensor, Tensor] | None:
        """``pseudo_features`` draws of earlier classes (uniform over them), their labels and the classes drawn
        from; None before there is any. Seeded by the task and the step, so a resumed run draws the same."""
        stats = self.class_statistics
        assert stats is not None
        pool = stats.known.cpu() & ~head.current.cpu()
        if self.route_head:
            planned = int(self.ham.router.planned)  # type: ignore[union-attr]  # the slot this task joins
            pool &= self.head.class_slot.cpu() == planned
        classes = torch.nonzero(pool).flatten()
        if classes.numel() == 0:
            return None
        generator = torch.Generator().manual_seed(1_000_003 * self.task + self.global_step)
        labels = classes[torch.randint(len(classes), (self.pseudo_features,), generator=generator)]
        return stats.draw(labels, generator), labels, pool

    def _eval_step(self, batch: tuple[Any, Tensor], dataloader_idx: int) -> None:
        x, y = batch
        self._task_accuracy().update(self.head.eval_logits(self(x).float()), y, task=dataloader_idx)

    def _task_accuracy(self, num_tasks: int | None = None) -> TaskAccuracy:
        """The `TaskAccuracy` of the evaluation running (one task per loader: Lightning's ``dataloader_idx``)."""
        if num_tasks is not None:  # a new evaluation: a fresh metric, not a module child (no state, no summary)
            self.__dict__["_accuracy"] = TaskAccuracy(num_tasks=max(1, num_tasks)).to(self.device)
        return self.__dict__["_accuracy"]

    def _log_task_accuracy(self, stage: str) -> None:
        # Already summed over processes by the metric: no sync_dist.
        self.log_dict(self._task_accuracy().log_dict(stage), add_dataloader_idx=False)

    @override
    def on_validation_epoch_start(self) -> None:
        loaders = max(len(self.trainer.num_val_batches), len(self.trainer.num_sanity_val_batches))
        self._task_accuracy(loaders)

    @override
    def on_test_epoch_start(self) -> None:
        self._task_accuracy(len(self.trainer.num_test_batches))

    @override
    def validation_step(self, batch: tuple[Any, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    @override
    def test_step(self, batch: tuple[Any, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_task_accuracy("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_task_accuracy("test")

    # -- optimisation -------------------------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        if not self.trains_anything:
            return None
        scalars = [p for p in self.ham.scalar_parameters() if p.requires_grad] if self.ham else []
        scalar_ids = {id(p) for p in scalars}
        heads = [h for h in (self.head, self.loss_head) if h is not None]
        head = [p for h in heads for p in h.parameters() if p.requires_grad]
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
    def _controller(self) -> HAMController:
        if self.ham is None:
            raise ValueError("This HAMModule has no adapters (adapt=False): there is nothing to export.")
        return self.ham

    def export_peft(self, path: str | Path) -> Path:
        """Save the merged delta as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
        from ham_lightning.core.export import export_peft

        return export_peft(self._controller(), path)

    def folded_backbone_state_dict(self) -> dict[str, Tensor]:
        """The backbone's state dict with the merged delta folded in: loads into a plain timm model."""
        from ham_lightning.core.export import folded_state_dict

        return folded_state_dict(self._controller())


def _feature_dim(backbone: nn.Module) -> int:
    from ham_lightning.core.backbones import backbone_feature_dim

    try:
        return backbone_feature_dim(backbone)
    except TypeError as err:
        raise ValueError(
            f"Cannot tell the feature size of {type(backbone).__name__}: pass feature_dim= (the size of the pooled "
            "features its forward returns)."
        ) from err


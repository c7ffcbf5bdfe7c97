"""``ham-lightning``: LightningCLI over a whole class-incremental sequence (train, merge, evaluate per task).

``ham-lightning fit`` with no config runs the quick start: the digits data set shipped with scikit-learn, the real
ImageNet EfficientNet-Lite0, 5 tasks. ``ham-lightning fit --config configs/<benchmark>.yaml`` runs a benchmark;
``validate`` / ``test`` evaluate a checkpoint on every task seen. Every knob of `HAMModule` (``--model.*``,
``--model.ham.*``), `ClassIncrementalDataModule` (``--data.*``) and `HierarchicalMergeCallback` (``--merge.*``) is
settable from YAML and the command line; ``--print_config`` prints a complete, re-runnable config.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from ham_lightning.lightning.callback import HierarchicalMergeCallback
from ham_lightning.data import ClassIncrementalDataModule
from ham_lightning.lightning.module import HAMModule
from ham_lightning.lightning.progress import TaskProgressBar
from ham_lightning.lightning.results import RunResults

#: The quick start's settings when no config is given (the embedded default of README.md).
QUICKSTART_DEFAULTS: dict[str, Any] = {
    "model.backbone": "tf_efficientnet_lite0",
    "model.pretrained": True,
    "model.ham": {"target_modules": ["conv_pw", "conv_pwl", "conv_head"]},
    "model.optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001, "weight_decay": 0.0}},
    "model.head": "cosine",
    "model.head_lr": 0.01,
    "data.dataset": "digits",
    "data.image_size": 64,
    "data.batch_size": 64,
    "data.epochs_per_task": 3,
}


def _backbone_name(backbone: Any) -> str | None:
    """The timm name a string backbone gives the datamodule's transforms (None for a module)."""
    return backbone if isinstance(backbone, str) else None


def wandb_offline() -> bool:
    """W&B runs offline unless the user set it up online (``WANDB_MODE=online`` or an API key in the env)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "run"):
        return False
    return mode in ("offline", "dryrun", "disabled") or not os.environ.get("WANDB_API_KEY")


class HAMLightningCLI(LightningCLI):
    """LightningCLI with the HAM callback, run folder, loggers and the task schedule wired in."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HierarchicalMergeCallback, "merge")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run folder name under --runs_dir (default: <benchmark>-<date>-<time>).")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Where run folders are created.")
        parser.add_argument("--benchmark", type=str, default="quickstart",
                            help="Benchmark name: groups the runs of one benchmark in W&B.")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("model.backbone", "data.backbone", compute_fn=_backbone_name)
        parser.set_defaults(QUICKSTART_DEFAULTS)

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.get("run_name"):
            config["run_name"] = f"{config['benchmark']}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(config["runs_dir"]) / config["run_name"]
        trainer = config["trainer"]
        if trainer.get("default_root_dir") is None:
            trainer["default_root_dir"] = str(run_dir)
        for logger in _as_list(trainer.get("logger")):
            if not hasattr(logger, "get"):
                continue
            args = logger.get("init_args")
            if args is None:
                continue
            if logger.get("class_path", "").endswith("WandbLogger"):
                if args.get("save_dir") in (None, "", "."):
                    args["save_dir"] = trainer["default_root_dir"]
                args["name"] = args.get("name") or config["run_name"]
                args["group"] = args.get("group") or config["benchmark"]
                if wandb_offline():
                    args["offline"] = True
            elif logger.get("class_path", "").endswith("CSVLogger"):
                if args.get("save_dir") in (None, "runs"):
                    args["save_dir"] = trainer["default_root_dir"]

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        data = self.datamodule
        epochs = getattr(data, "epochs_per_task", None) or self.config_init[self.subcommand]["merge"].epochs_per_task
        if epochs and config.get("max_epochs") is None:
            config["max_epochs"] = epochs * data.num_tasks  # the whole sequence in one fit
        if epochs and not config.get("reload_dataloaders_every_n_epochs"):
            config["reload_dataloaders_every_n_epochs"] = 1  # each task serves its own loader
        if self.subcommand == "fit" and config.get("limit_val_batches") is None:
            config["limit_val_batches"] = 0  # fit evaluates at task boundaries (the accuracy matrix), not per epoch
        run_dir = Path(config["default_root_dir"])
        callbacks = list(callbacks)
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint)
                                                                for c in _as_list(config.get("callbacks"))):
            # last.ckpt after every epoch: a killed run resumes with --ckpt_path <run>/checkpoints/last.ckpt
            callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0))
        callbacks.append(RunResults(dirpath=str(run_dir), config=_plain(self.config[self.subcommand])))
        if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, TaskProgressBar) for c in _as_list(config.get("callbacks"))):
            callbacks.append(TaskProgressBar())
        return super()._instantiate_trainer(config, callbacks)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _plain(namespace: Any) -> Any:
    """A jsonargparse Namespace as plain dicts/lists (for results.json)."""
    if hasattr(namespace, "as_dict"):
        namespace = namespace.as_dict()
    if isinstance(namespace, dict):
        return {k: _plain(v) for k, v in namespace.items() if not re.match(r"^__", k)}
    if isinstance(namespace, (list, tuple)):
        return [_plain(v) for v in namespace]
    return namespace if isinstance(namespace, (str, int, float, bool, type(None))) else str(namespace)


TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "logger": [
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"project": "ham-lightning", "offline": True, "log_model": False}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
    ],
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "deterministic": "warn",
}


def cli(args: list[str] | None = None, run: bool = True) -> HAMLightningCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line, for tests and notebooks."""
    return HAMLightningCLI(
        HAMModule,
        ClassIncrementalDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=1993,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """Entry point of the ``ham-lightning`` command."""
    cli()


if __name__ == "__main__":
    main()

"""The CLI's config: trainer defaults, the quick start, HAM's option help, plain copies, and ``config.yaml``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from typing_extensions import override

from ham_lightning.core.config import HAMConfig

#: The quick start's settings: what ``ham-lightning <subcommand>`` uses when no ``--config`` is given.
QUICKSTART_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def _backbone_name(backbone: Any) -> str | None:
    """The timm name a string backbone gives the datamodule's transforms (None for a module)."""
    return backbone if isinstance(backbone, str) else None


def wandb_offline() -> bool:
    """W&B runs offline unless the user set it up online (``WANDB_MODE=online`` or an API key in the env)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "run"):
        return False
    return mode in ("offline", "dryrun", "disabled") or not os.environ.get("WANDB_API_KEY")


class RunConfig(SaveConfigCallback):
    """Writes the resolved config to ``<run>/config.yaml`` and logs all of it to every logger.

    Loggers get the whole config (model, HAM, optimizer, data, merge, trainer), so W&B runs and ``hparams.yaml``
    can be filtered and compared on any setting; Lightning itself logs only the module's init arguments.
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, run_dir: Path, write: bool,
                 logged: dict[str, Any]) -> None:
        super().__init__(parser, config, save_to_log_dir=False)
        self.run_dir, self.write, self.logged = run_dir, write, logged

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.write:
            self.parser.save(self.config, str(self.run_dir / "config.yaml"), skip_none=False, overwrite=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.logged)


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _ham_value(config: Any, key: str) -> Any:
    ham = config.get("model", {}).get("ham")
    return ham.get(key) if ham is not None and hasattr(ham, "get") else None


def _config_name(config: Any) -> str | None:
    """The stem of the last ``--config`` file (``configs/cifar100_10_vit_b16.yaml`` -> ``cifar100_10_vit_b16``)."""
    files = config.get("config") or config.get("__default_config__")
    files = _as_list(files)
    return Path(str(files[-1])).stem if files else None


def _ham_field_helps() -> dict[str, str]:
    from dataclasses import fields

    return {f.name: f.metadata["help"] for f in fields(HAMConfig) if f.metadata.get("help")}


def _document_ham_config() -> None:
    """An ``Args:`` section in HAMConfig's docstring from its fields' ``metadata["help"]``, once: jsonargparse
    describes a dataclass's options (``--model.ham.help HAMConfig``) from its docstring, not from metadata."""
    doc = HAMConfig.__doc__ or ""
    if "\n    Args:\n" in doc:
        return
    lines = [f"        {name}: {text}" for name, text in _ham_field_helps().items()]
    HAMConfig.__doc__ = doc.rstrip() + "\n\n    Args:\n" + "\n".join(lines) + "\n"


def _describe_ham_options(parser: LightningArgumentParser) -> None:
    """Help that helps: ``--model.ham`` lists HAM's options with their descriptions (from HAMConfig's field
    metadata), and options typed ``nn.Module`` do not list every ``nn.Module`` subclass there is."""
    _document_ham_config()
    fields = "; ".join(f"{name}: {text.rstrip('.')}" for name, text in _ham_field_helps().items())
    for action in parser._actions:
        dest = getattr(action, "dest", "")
        if dest == "model.ham":
            action.help = (f"{action.help or ''} Set each with --model.ham.<option> (or --model.ham.help HAMConfig "
                           f"for types and defaults). Options: {fields}.")
        if "Module" in str(getattr(action, "_typehint", "")) and hasattr(action, "extra_help"):
            # jsonargparse would list every importable nn.Module subclass (1,500+ lines, and seconds to find).
            action.extra_help = lambda: ", or any torch.nn.Module as class_path + init_args"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _plain(namespace: Any) -> Any:
    """A jsonargparse Namespace as plain dicts/lists (for results.json and checkpoints)."""
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
        # save_dir: the run folder (filled in by the CLI, as for every logger that has one).
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
    ],
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "deterministic": "warn",
}


def link_prefix_cut(config: Any) -> str | None:
    """The prefix cut has one owner, ``model.ham.adapt_from``: it sets ``data.prefix_cache.adapt_from`` when that
    is left out (in place); both given and different is refused. Returns the refusal's message, or None."""
    from ham_lightning.core.prefix import canonical_point

    data = config.get("data") or {}
    cache = data.get("prefix_cache") if hasattr(data, "get") else None
    if cache is not None and hasattr(cache, "get") and cache.get("init_args") is not None:
        cache = cache["init_args"]  # parsed as the PrefixCacheConfig dataclass: class_path + init_args
    if cache is None or not hasattr(cache, "get"):
        return None
    ham = config.get("model", {}).get("ham")
    model_cut = ham.get("adapt_from") if ham is not None and hasattr(ham, "get") else None
    cache_cut = cache.get("adapt_from")
    if cache_cut is None:
        if model_cut is None:
            return ("--data.prefix_cache caches the frozen part below the adapted one: set --model.ham.adapt_from "
                    "(e.g. blocks.6); it sets the cache's cut too.")
        cache["adapt_from"] = model_cut
        return None
    if model_cut is None or canonical_point(str(model_cut)) != canonical_point(str(cache_cut)):
        return (f"The prefix cut is set twice: --model.ham.adapt_from {model_cut} and --data.prefix_cache.adapt_from "
                f"{cache_cut}; the model would train on activations cached at another block. Set only "
                "--model.ham.adapt_from (it sets the cache's), or make both the same.")
    return None


def with_quickstart(argv: list[str]) -> list[str]:
    """``argv`` with ``--config configs/quickstart.yaml`` after the subcommand when no ``--config`` is given.

    The quick start's settings are a config file like any other, so they never leak into a ``--config`` run.
    """
    subcommands = LightningCLI.subcommands()
    position = next((i for i, a in enumerate(argv) if a in subcommands), None)
    if position is None or any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        return argv
    if not QUICKSTART_CONFIG.is_file():
        raise FileNotFoundError(
            f"No --config given, and the quick start's config {QUICKSTART_CONFIG} is missing (ham-lightning "
            "installed without its repository?). Pass --config <file>.yaml.")
    return [*argv[: position + 1], "--config", str(QUICKSTART_CONFIG), *argv[position + 1:]]

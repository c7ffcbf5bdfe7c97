"""Known-harmless third-party messages that a ``ham-lightning`` command causes, silenced for its duration only.

Each is caused by how the project uses the library, not by the user's settings, and says nothing the user can act
on: Lightning's litlogger advertisement, its ``LeafSpec`` use that torch deprecates, its count of modules in eval
mode (HAM keeps the frozen backbone's norm layers in eval mode on purpose), its ``log_every_n_steps`` notice
(a task of a few batches is shorter than the logging interval by design), its args-and-argv notice for in-process
calls (`cli` from tests, notebooks and the benchmark scripts), torch's deprecation of the all_gather Lightning
uses (predict under DDP), and W&B's notice about the ``anonymous`` setting that Lightning's `WandbLogger` always
passes. The filters are installed when a command starts and removed when it returns: nothing changes for the code
around it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

#: Warning messages (regular expressions matched at their start) filtered while a command runs.
WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"LightningCLI's args parameter is intended to run from within Python",
    r"torch.distributed.nn.functional.all_gather is deprecated",  # Lightning's all_gather (predict under DDP)
)
#: Loggers through which Lightning's `rank_zero_info` prints (the name depends on the import order).
_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero")


class _DropTips(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


@contextlib.contextmanager
def known_noise_silenced() -> Iterator[None]:
    """Silence `WARNINGS` and Lightning's tips for the duration of the block (restored after)."""
    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in _INFO_LOGGERS]
    with warnings.catch_warnings():
        for message in WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(tips)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(tips)


def drop_wandb_anonymous(loggers: Any) -> None:
    """Remove the ``anonymous`` argument Lightning's `WandbLogger` passes to ``wandb.init`` (None by default),
    for which W&B prints a deprecation notice at every run; the run is created later, without it."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(logger, WandbLogger) and isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)


def finish_wandb(loggers: Any, finished: bool, quiet: bool = False) -> None:
    """Close the W&B runs of ``loggers`` (a command's trainer's; flushed to disk offline), so the next command in
    the process gets its own: Lightning's WandbLogger would otherwise reuse the run left open. ``quiet`` (after a failed write, the
    disk likely full): W&B's own failures to write are neither printed nor raised, so the one error that
    stopped the run is what the user sees."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_log = logging.getLogger("wandb")
    level = wandb_log.level
    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            if not quiet:
                logger._experiment.finish(exit_code=0 if finished else 1)
                continue
            wandb_log.setLevel(logging.CRITICAL)
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                    contextlib.redirect_stderr(devnull):
                try:
                    logger._experiment.finish(exit_code=1)
                except Exception:  # noqa: S110 (the write failure that stopped the run is reported instead)
                    pass
                finally:
                    wandb_log.setLevel(level)

"""``<run>/checkpoints/last.ckpt``: the checkpoint the CLI writes, the one way to resume a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from ham_lightning.lightning.checkpoint_io import previous_path, use_atomic_checkpoints

#: Where the CLI keeps its own state in a Lightning checkpoint (the resolved config the run started with).
CHECKPOINT_KEY = "ham_lightning_cli"


class SequenceCheckpoint(Checkpoint):
    """``<run>/checkpoints/last.ckpt`` after every training epoch, so also after every task boundary's merge.

    A `Checkpoint` subclass, so Lightning runs it after the other callbacks' epoch-end hooks (the boundary's
    merge and evaluation are in the file). Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes
    ``last.ckpt`` only with a top-k save, and skips epochs without an optimizer step (``ncm``), hence this one.
    Writes go through `AtomicCheckpointIO` (installed at setup): a temporary file in ``checkpoints/``, fsynced and
    renamed over ``last.ckpt``, the file it replaces kept as ``last.prev.ckpt``; a kill at any byte leaves
    ``last.ckpt`` whole (the old one), on any filesystem. The file also holds the resolved CLI config, against which a resume is checked.
    """

    def __init__(self, dirpath: str | Path, config: dict[str, Any] | None = None,
                 resume_command: str | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.config = config
        self.resume_command = resume_command

    @property
    def path(self) -> Path:
        return self.dirpath / "last.ckpt"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        use_atomic_checkpoints(trainer.strategy)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Rank 0's view, on every rank: a save is collective (a barrier), so all ranks must take the same branch.
        exists = trainer.strategy.broadcast(self.path.exists())
        if trainer.ckpt_path is None and not exists:
            self._save(trainer, "start")  # a new run: a kill in its first epoch still leaves a file to resume from

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, "epoch_end")

    def _save(self, trainer: Trainer, point: str) -> None:
        self._point = point
        trainer.save_checkpoint(self.path, weights_only=False)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"config": self.config, "saved_at": getattr(self, "_point", None),
                                      "format": 1}

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        what = "SIGTERM" if isinstance(exception, SIGTERMException) else "Interrupted"
        saved = next((p for p in (self.path, previous_path(self.path)) if p.is_file()), None)
        if saved is not None:  # last.prev.ckpt alone: a resume from it stopped before its first epoch ended
            rank_zero_info(f"{what}: the run stopped; {saved} holds it {_checkpoint_point(saved)}. "
                           f"Resume with:\n  {self.resume_command}")
        else:
            rank_zero_info(f"{what}: the run stopped before training started; nothing to resume (start it again "
                           "with the same command: its folder is reused).")


def _checkpoint_point(path: Path) -> str:
    """``at the start of training`` or ``up to the end of epoch N, K tasks finished`` (N from 1; for the message
    after a stop)."""
    try:
        import torch

        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a message only: never fail the shutdown over it
        return "as last saved"
    if (checkpoint.get(CHECKPOINT_KEY) or {}).get("saved_at") == "start":
        return "at the start of training"
    epoch = checkpoint.get("epoch")
    if not isinstance(epoch, int):
        return "as last saved"
    # Counted from 1, as the progress bar and the task lines count (Lightning's `epoch` is 0-based).
    finished = next((len(state.get("rows") or []) for key, state in (checkpoint.get("callbacks") or {}).items()
                     if "HierarchicalMergeCallback" in str(key) and isinstance(state, dict)), None)
    tasks = f", {finished} task{'s' if finished != 1 else ''} finished" if finished is not None else ""
    return f"up to the end of epoch {epoch + 1}{tasks}"


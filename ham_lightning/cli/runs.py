"""Run folders: a run owns ``<runs_dir>/<run_name>``; a new run never writes into a folder that holds another."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ham_lightning.disk import LockHeld, exclusive

#: The marker of a folder in use by a run (holds the owner's process id while it runs).
LOCK_NAME = ".ham-lightning.lock"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used: it holds another run, or another process is running in it."""


class RunFolder:
    """Exclusive use of ``path`` by this process: a lock held until `release` (or the process's end).

    The lock (`ham_lightning.disk.exclusive`, the `filelock` package: Linux, macOS and Windows) goes away with its
    process, even one killed by SIGKILL, so a killed run's folder can be resumed at once; two processes can never
    both hold one. The owner's process id is written beside it, for the message another process gets.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: Any = None
        #: Whether `claim_new_run` took it over from a run that never reached its first checkpoint.
        self.reused = False

    @property
    def owner_file(self) -> Path:
        return self.path / (LOCK_NAME + ".pid")

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            lock = exclusive(self.path / LOCK_NAME)
        except LockHeld:
            try:
                owner = self.owner_file.read_text().strip() or "?"
            except OSError:
                owner = "?"
            raise RunFolderError(
                f"{self.path} is in use by another run (process {owner}). Wait for it to end, or choose another "
                "--run_name."
            ) from None
        self.owner_file.write_text(str(os.getpid()))
        self._lock = lock

    def others(self) -> list[str]:
        """What the folder holds besides the lock: another run's files."""
        mine = (LOCK_NAME, self.owner_file.name)
        return sorted(p.name for p in self.path.iterdir() if p.name not in mine) if self.path.is_dir() else []

    def release(self) -> None:
        if self._lock is not None:
            for name in (self.owner_file, self.path / LOCK_NAME):  # while held: no other process is using them
                with contextlib.suppress(OSError):  # Windows keeps a locked file
                    name.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None


#: Run folders held by the CLI calls in progress in this process (released when each call returns).
_HELD: list[RunFolder] = []

#: What a ``fit`` writes into its folder before its first checkpoint (loggers, the config, the checkpoint folder).
UNSTARTED_FILES = frozenset({"csv", "wandb", "lightning_logs", "config.yaml", "checkpoints"})


def never_started(path: Path) -> bool:
    """Whether ``path`` holds only what a ``fit`` that stopped before its first checkpoint leaves (a kill while
    the prefix cache was built, a bad image found at setup): nothing to resume and no result, so the same
    command and ``--run_name`` may start it again there."""
    names = {p.name for p in path.iterdir() if p.name not in (LOCK_NAME, LOCK_NAME + ".pid")} if path.is_dir() else set()
    if not names <= UNSTARTED_FILES:
        return False
    checkpoints = path / "checkpoints"
    return not checkpoints.is_dir() or not any(p.suffix == ".ckpt" for p in checkpoints.iterdir())


def claim_new_run(runs_dir: Path, run_name: str | None, default_name: str, reuse_unstarted: bool = False
                  ) -> RunFolder:
    """A fresh folder for a new run: ``run_name`` if free, else refused; an automatic name gets ``-2``, ``-3``...

    With ``reuse_unstarted`` (``fit``), a ``run_name`` folder whose run never reached its first checkpoint
    (`never_started`) is taken over, its leftovers kept (the loggers start new versions); ``folder.reused`` says
    so.
    """
    candidates: Iterator[str]
    if run_name:
        candidates = iter([run_name])
    else:
        candidates = (default_name if k == 1 else f"{default_name}-{k}" for k in range(1, 1000))
    for name in candidates:
        folder = RunFolder(runs_dir / name)
        reusable = bool(run_name) and reuse_unstarted and never_started(folder.path)
        if folder.others() and not reusable:
            if run_name:
                _refuse_taken(folder)
            continue
        try:
            folder.acquire()
        except RunFolderError:
            if run_name:
                raise
            continue
        # Another run may have claimed and filled it (or started training in it) between our check and our lock.
        if folder.others() and not (reusable and never_started(folder.path)):
            folder.release()
            if run_name:
                _refuse_taken(folder)
            continue
        folder.reused = bool(folder.others())
        return folder
    raise RunFolderError(f"No free run folder named {default_name}[-k] under {runs_dir}.")


def _refuse_taken(folder: RunFolder) -> None:
    shown = ", ".join(folder.others()[:4])
    resume = folder.path / "checkpoints" / "last.ckpt"
    hint = (f"; to continue that run: --ckpt_path {resume}" if resume.is_file() else "")
    raise RunFolderError(
        f"{folder.path} already holds a run ({shown}). A new run never writes into another run's folder: choose "
        f"another --run_name (or leave it out for a fresh dated one){hint}."
    )


def resumed_run_folder(ckpt_path: Path) -> Path | None:
    """The run folder a ``<run>/checkpoints/<file>.ckpt`` belongs to (None for a checkpoint kept elsewhere)."""
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent
    return None


"""What a run that cannot go on tells its user: a failed write in one line, a resume of a run that never
started explained (issue 24)."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from ham_lightning.cli.runs import never_started, resumed_run_folder
from ham_lightning.lightning.checkpoint_io import CheckpointWriteError, free_bytes, previous_path

_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def write_failure(err: BaseException) -> OSError | None:
    """The failed write behind ``err`` (itself or what it was raised from): a `CheckpointWriteError`, or an
    `OSError` of a full disk or a read-only filesystem; None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CheckpointWriteError) or (
                isinstance(current, OSError) and current.errno in _WRITE_ERRNOS):
            return current
        current = current.__cause__ or current.__context__
    return None


def write_failure_message(err: OSError) -> str:
    """One line: what could not be written, why, the free space there, and how to go on."""
    if isinstance(err, CheckpointWriteError):
        message = str(err)
    else:
        path = Path(str(err.filename)) if err.filename else None
        message = f"Cannot write {path or 'a file'}: {err.strerror or err}"
        if path is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = next((p for p in (path, *path.parents) if p.is_dir()), None)
            free = free_bytes(folder) if folder is not None else None
            if free is not None:
                message += f" ({folder} has {free / 1e6:,.1f} MB free); free some space there"
        message += "."
    resume = getattr(err, "resume_command", None)
    return message + (f" Then resume with: {resume}" if resume else " Then start the run again.")


def refuse_resuming_an_unstarted_run(argv: list[str]) -> None:
    """The README's resume command on a run that stopped before its first checkpoint (no ``config.yaml`` yet, so
    the parser would only say the file does not exist): say what happened and what to run instead."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--ckpt_path"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--ckpt_path=")]
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in values:
        path = Path(value)
        folder = resumed_run_folder(path)
        if (folder is None or path.is_file() or previous_path(path).is_file() or not never_started(folder)
                or all(Path(c).is_file() for c in configs)):
            continue
        print(f"ham-lightning: error: {folder} holds a run that stopped before its first checkpoint, so there is "
              "nothing to resume: start it again with the command that started it (the same --run_name reuses "
              "the folder).", file=sys.stderr)
        raise SystemExit(2)

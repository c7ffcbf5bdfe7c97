"""Checkpoint files that a kill, a power loss or a full disk never leaves half-written, on any filesystem.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction: the file is written in ``$TMPDIR`` and then
*moved* over the destination, which is a copy when the run folder is on another filesystem (a tmpfs ``/tmp``, a
separate data disk), so a kill during that copy truncates ``last.ckpt``. `AtomicCheckpointIO` writes a temporary
file next to the destination, flushes and fsyncs it, renames it over the destination (atomic within one folder)
and fsyncs the folder. The file it replaces is kept as ``<stem>.prev<suffix>`` (``last.prev.ckpt``) until the
next write begins, so a checkpoint damaged after it was written (a disk error, a copy cut short) still has a whole
predecessor, which `resume_checkpoint` falls back to, saying so.

A write that cannot complete (disk full, a read-only folder) raises `CheckpointWriteError`, naming the file, the
bytes it needs and the bytes free; ``last.ckpt`` is untouched. `check_room` refuses a run whose folder cannot
hold its checkpoints before it starts (`checkpoint_bytes` estimates one).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

#: Bytes written per ``write`` call (a write failure is noticed within one chunk).
CHUNK = 1 << 22
#: Free space kept beyond a checkpoint's own size before writing it (file-system metadata, logs written meanwhile).
MARGIN = 1 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission...); the existing files are untouched.

    ``errno`` and ``filename`` as in any `OSError`; ``str()`` is the message alone (one line for the user)."""

    def __str__(self) -> str:
        return str(self.strerror)


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``last.ckpt`` -> ``last.prev.ckpt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def damaged_path(path: str | os.PathLike[str]) -> Path:
    """Where a damaged checkpoint is moved when a resume falls back to its predecessor."""
    path = Path(path)
    return path.with_name(f"{path.stem}.damaged{path.suffix}")


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def free_bytes(folder: Path) -> int | None:
    """Bytes free for this user on ``folder``'s filesystem (None where it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_chunks(fd: int, data: memoryview) -> None:
    """All of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:done + CHUNK])


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists (another user's) or cannot be asked: keep its files
        return True
    return True


def _remove_dead_temporaries(folder: Path, *names: str) -> None:
    """Delete ``.<name>.tmp-<pid>`` files in ``folder`` left by processes that were killed while writing."""
    for name in names:
        for tmp in folder.glob(f".{name}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: bytes | memoryview, keep_previous: bool = True) -> None:
    """Write ``data`` to ``path`` so that at every instant ``path`` holds either its old or its new content, whole.

    The bytes go to ``.<name>.tmp-<pid>`` in ``path``'s folder (the same filesystem, so the rename is atomic),
    are fsynced, and the temporary file is renamed over ``path``; then the folder is fsynced. With
    ``keep_previous`` the old ``path`` then stays as `previous_path` (a hard link, so no copy and no extra space;
    renamed where hard links are not supported); the older predecessor is deleted before the write. Raises `CheckpointWriteError` before touching anything when the
    folder has less free space than ``data`` needs, and when a write fails.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    view = memoryview(data).cast("B")
    previous = previous_path(path)
    _remove_dead_temporaries(folder, path.name, previous.name)
    # The predecessor of `path` is dropped before the new file is written (`path` itself stays whole meanwhile),
    # so a run folder needs room for two checkpoints, not three.
    drop = keep_previous and path.is_file() and previous.is_file() and previous.stat().st_nlink == 1
    reclaimable = previous.stat().st_size if drop else 0
    free = free_bytes(folder)
    if free is not None and free + reclaimable < len(view) + MARGIN:
        raise CheckpointWriteError(
            errno.ENOSPC,
            f"Cannot write the checkpoint {path}: it needs {_human(len(view))} and {folder} has "
            f"{_human(free + reclaimable)} free (no space left on device). Free at least "
            f"{_human(len(view) + MARGIN - free - reclaimable)} there; the checkpoints already written are whole.",
            str(path))
    if drop:
        previous.unlink()
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_chunks(fd, view)
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_previous and path.is_file():
            link = folder / f".{previous.name}.tmp-{os.getpid()}"
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
                os.replace(link, previous)
            except OSError:  # no hard links here (FAT, some network filesystems): keep the old file by renaming
                link.unlink(missing_ok=True)
                os.replace(path, previous)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        free = free_bytes(folder)
        space = (f"; it needs {_human(len(view))} and {folder} has {_human(free)} free"
                 if err.errno in (errno.ENOSPC, errno.EDQUOT) and free is not None else "")
        raise CheckpointWriteError(
            err.errno, f"Cannot write the checkpoint {path}: {err.strerror or err}{space}. The checkpoints already "
            "written are whole.", str(path)) from err
    _fsync_folder(folder)


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """A lower bound of the bytes a training checkpoint of ``module`` takes: its ``state_dict``'s tensors (the
    optimizer's state and Lightning's own entries come on top)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def check_room(path: str | os.PathLike[str], size: int) -> None:
    """Refuse (`CheckpointWriteError`) before a run starts when ``path``'s folder cannot hold the checkpoints of
    ``size`` bytes that `write_atomic` keeps there: two (the last one and the one being written), less what the
    files already there free."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.is_dir()), None)
    free = free_bytes(folder) if folder is not None else None
    if free is None:
        return
    there = sum(p.stat().st_size for p in (path, previous_path(path)) if p.is_file())
    needed = max(size, 2 * size - there) + MARGIN
    if free < needed:
        raise CheckpointWriteError(
            errno.ENOSPC,
            f"Cannot write the checkpoints {path}: this run's need at least {_human(needed)} ({_human(size)} each, "
            f"two at a time) and {folder} has {_human(free)} free (no space left on device). Free at least "
            f"{_human(needed - free)} there, or choose another --runs_dir.", str(path))


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint file at ``path`` cannot be loaded (None: it can): missing, empty, truncated, not a
    checkpoint."""
    path = Path(path)
    if not path.is_file():
        return "it does not exist"
    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError... for a damaged file
        first = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
        return f"it cannot be read ({type(err).__name__}: {first})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "it is not a Lightning checkpoint (no state_dict)"
    return None


def resume_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """The checkpoint a resume from ``path`` loads, and what to tell the user (None: ``path`` itself, whole).

    A damaged or missing ``path`` whose `previous_path` is whole gives that one (the caller then moves the damaged
    file aside with `set_aside`, once it owns the folder, so that the next save keeps the good one as ``.prev``).
    When neither can be loaded, ``path`` is returned with the reason.
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is None:
        return path, None
    previous = previous_path(path)
    previous_problem = checkpoint_problem(previous)
    if previous_problem is not None:
        extra = ("; there is no previous checkpoint to fall back to" if not previous.exists()
                 else f"; the previous one, {previous}, is damaged too ({previous_problem})")
        return path, f"The checkpoint {path} is damaged: {problem}{extra}."
    return previous, (f"The checkpoint {path} is damaged: {problem}. Resuming from the checkpoint written before "
                      f"it, {previous}" + (f"; the damaged file is kept as {damaged_path(path)}." if path.exists()
                                          else "."))


def set_aside(path: str | os.PathLike[str]) -> Path | None:
    """Move a damaged checkpoint to `damaged_path` (replacing an older one there); where it went, if it existed."""
    path = Path(path)
    if not path.exists():
        return None
    os.replace(path, damaged_path(path))
    return damaged_path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves go through `write_atomic` (remote URLs: Lightning's own path).

    Args:
        keep_previous: keep the file a save replaces as ``<stem>.prev<suffix>`` (one predecessor per file).
    """

    def __init__(self, keep_previous: bool = True) -> None:
        self.keep_previous = keep_previous

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if "file" not in fs.protocol and "local" not in fs.protocol:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (a local file), got {storage_options!r}.")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(Path(str(path).removeprefix("file://")), buffer.getbuffer(), keep_previous=self.keep_previous)


def use_atomic_checkpoints(strategy: Any) -> bool:
    """Give ``strategy`` an `AtomicCheckpointIO` when it uses Lightning's default `TorchCheckpointIO` (a user's own
    checkpoint IO is left alone, with a warning). Whether it was installed."""
    current = getattr(strategy, "checkpoint_io", None)
    if isinstance(current, AtomicCheckpointIO):
        return True
    if current is not None and type(current) is not TorchCheckpointIO:
        rank_zero_warn(f"The strategy's checkpoint IO is {type(current).__name__}, not Lightning's default: "
                       "checkpoints are written by it, so their atomicity is its own.")
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True

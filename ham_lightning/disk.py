"""Files on disk shared between processes: a portable lock and files written whole or not at all.

The two disk caches (decoded splits, `ham_lightning.data.image_store.cached_array`; prefix activations,
`ham_lightning.data.feature_cache`) and the CLI's run folders use these, so they behave the same on Linux, macOS
and Windows: the lock is the `filelock` package's (``fcntl`` where it exists, ``msvcrt`` on Windows), released by
the system when its process dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

__all__ = ["LockHeld", "atomic_file", "cached_file", "exclusive", "locked", "temporary_name"]

T = TypeVar("T")


class LockHeld(RuntimeError):
    """Another process holds the lock (raised by `exclusive`)."""


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock file ``path`` (created if needed), waiting for another process to release it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def exclusive(path: str | os.PathLike[str]) -> FileLock:
    """The lock file ``path``, acquired now or `LockHeld` if another process holds it; ``release()`` it when done
    (or let the process end)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LockHeld(str(path)) from None
    return lock


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written before it is moved in place: ``<stem>.tmp-<pid><suffix>`` beside it."""
    return path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write; when the block ends without error it replaces ``path`` in one step (an
    atomic rename), so a reader sees the old file or the whole new one; on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_file(path: str | os.PathLike[str], read: Callable[[Path], T], write: Callable[[Path], T]) -> T:
    """``read(path)`` if ``path`` is there and readable, else ``write(tmp)`` then moved to ``path`` atomically;
    under the lock ``<path>.lock``, so concurrent processes build it once and never see half a file.

    ``read`` raises `OSError` or `ValueError` for a file it cannot use (then it is rebuilt); ``write`` returns
    what ``read`` would.
    """
    path = Path(path)
    with locked(path.with_name(path.name + ".lock")):
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                return read(path)
        with atomic_file(path) as tmp:
            value = write(tmp)
        return value

"""`ham_lightning.disk`: the portable lock and the write-whole-or-not-at-all helpers the disk caches share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ham_lightning.disk import LockHeld, atomic_file, cached_file, exclusive


def test_atomic_file_replaces_whole_or_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.json"
    with atomic_file(path) as tmp:
        tmp.write_text("one")
        assert not path.exists()  # nothing at the final path until the block ends
    assert path.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "one" and sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_cached_file_builds_once_and_rebuilds_what_it_cannot_read(tmp_path: Path) -> None:
    path, built = tmp_path / "v.txt", []

    def write(tmp: Path) -> str:
        built.append(1)
        tmp.write_text("value")
        return "value"

    def read(p: Path) -> str:
        text = p.read_text()
        if text != "value":
            raise ValueError("corrupt")
        return text

    assert cached_file(path, read, write) == "value" and cached_file(path, read, write) == "value"
    assert len(built) == 1
    path.write_text("garbage")
    assert cached_file(path, read, write) == "value" and len(built) == 2


def test_an_exclusive_lock_is_refused_to_another_process_until_released(tmp_path: Path) -> None:
    lock_path = tmp_path / "run.lock"
    probe = (f"from ham_lightning.disk import exclusive, LockHeld\ntry:\n    exclusive({str(lock_path)!r})\n"
             "    print('acquired')\nexcept LockHeld:\n    print('held')")
    lock = exclusive(lock_path)
    try:
        assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "held"
        with pytest.raises(LockHeld):
            exclusive(lock_path)  # another lock object in this process too
    finally:
        lock.release()
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "acquired"

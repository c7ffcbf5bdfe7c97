"""Checkpoint writes that a kill at any byte, a full disk or a damaged file never turn into a lost run.

In-process, the writer is cut after N bytes (what a kill does); in real subprocesses, a process saving in a loop
on a tmpfs (another filesystem than ``$TMPDIR``) gets SIGKILL at random points, and every time ``last.ckpt`` and
``last.prev.ckpt`` are whole checkpoints.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import mounted_tmpfs, unmount

from ham_lightning.lightning import checkpoint_io
from ham_lightning.lightning.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    checkpoint_problem,
    previous_path,
    resume_checkpoint,
    set_aside,
)


def checkpoint(version: int, numel: int = 1000) -> dict:
    """A Lightning-like checkpoint whose every number is ``version``."""
    return {"state_dict": {"w": torch.full((numel,), float(version))}, "epoch": version}


def version_of(path: Path) -> int:
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(ckpt["state_dict"]["w"], torch.full_like(ckpt["state_dict"]["w"], float(ckpt["epoch"])))
    return ckpt["epoch"]


def save(path: Path, version: int) -> None:
    AtomicCheckpointIO().save_checkpoint(checkpoint(version), path)


def test_a_save_replaces_the_file_and_keeps_the_one_it_replaced(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    save(path, 1)
    assert version_of(path) == 1 and not previous_path(path).exists()
    save(path, 2)
    save(path, 3)
    assert version_of(path) == 3 and version_of(tmp_path / "checkpoints" / "last.prev.ckpt") == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no temporary left


@pytest.mark.parametrize("cut", [0, 1, 0.5, -1, None])
def test_a_write_cut_at_any_byte_leaves_both_checkpoints_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               cut: float | None) -> None:
    path = tmp_path / "last.ckpt"
    save(path, 1)
    save(path, 2)
    real = checkpoint_io._write_chunks

    def killed(fd: int, data: memoryview) -> None:
        n = len(data) if cut is None else int(cut * len(data)) if isinstance(cut, float) else cut % len(data)
        real(fd, data[:n])
        raise KeyboardInterrupt  # as a kill: nothing after this point runs

    monkeypatch.setattr(checkpoint_io, "_write_chunks", killed)
    with pytest.raises(KeyboardInterrupt):
        save(path, 3)
    assert version_of(path) == 2  # whole; its predecessor was dropped to make room for the new file
    assert not previous_path(path).exists()
    assert resume_checkpoint(path) == (path, None)
    monkeypatch.undo()
    save(path, 4)
    assert version_of(path) == 4 and version_of(previous_path(path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]


def test_a_full_disk_names_the_file_and_the_space_and_leaves_the_last_checkpoint(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    save(path, 1)
    save(path, 2)

    def full(fd: int, data: memoryview) -> None:
        os.write(fd, data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "_write_chunks", full)
    with pytest.raises(CheckpointWriteError, match=rf"Cannot write the checkpoint {path}: No space left on device; "
                                                   r"it needs [\d.]+ KB and .* free") as err:
        save(path, 3)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert version_of(path) == 2 and not previous_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial file deleted

    # Less free space than the checkpoint needs: refused before a byte is written.
    monkeypatch.setattr(checkpoint_io, "free_bytes", lambda folder: 5000)
    with pytest.raises(CheckpointWriteError, match=r"it needs [\d.]+ KB and .* has 5.0 KB free \(no space left "
                                                   r"on device\)\. Free at least [\d.]+ MB there"):
        save(path, 3)
    assert version_of(path) == 2


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    save(path, 1)
    save(path, 2)
    os.truncate(path, 100)
    assert "cannot be read" in checkpoint_problem(path)
    usable, message = resume_checkpoint(path)
    assert usable == previous_path(path) and version_of(usable) == 1
    assert message.startswith(f"The checkpoint {path} is damaged: it cannot be read") and str(usable) in message
    assert set_aside(path) == tmp_path / "last.damaged.ckpt" and not path.exists()
    usable, message = resume_checkpoint(path)  # a kill between the set-aside and the next save
    assert usable == previous_path(path) and message == (
        f"The checkpoint {path} is damaged: it does not exist. Resuming from the checkpoint written before it, "
        f"{previous_path(path)}.")
    save(path, 3)  # the next save after such a resume keeps the whole predecessor
    assert version_of(path) == 3 and version_of(previous_path(path)) == 1

    previous_path(path).write_bytes(b"")
    os.truncate(path, 0)
    usable, message = resume_checkpoint(path)
    assert usable == path and "it is empty (0 bytes)" in message and "is damaged too" in message


#: Saves versions 1, 2, 3... of an 8 MB checkpoint to argv[1] in a loop, printing each version once it is saved.
_SAVER = """
import sys, torch
from ham_lightning.lightning.checkpoint_io import AtomicCheckpointIO
io, version = AtomicCheckpointIO(), 1
while True:
    io.save_checkpoint({"state_dict": {"w": torch.full((1 << 21,), float(version))}, "epoch": version}, sys.argv[1])
    print(version, flush=True)
    version += 1
"""


def test_sigkill_at_random_points_of_writes_on_another_filesystem_than_tmpdir(tmp_path: Path) -> None:
    """Two writers at once (their interpreters start together), each killed at a random point of its saves."""
    mount = mounted_tmpfs(tmp_path / "mnt", "96m")
    try:
        tmpdir = tmp_path / "tmp"  # on the test's own filesystem, not the tmpfs
        tmpdir.mkdir()
        paths = [mount / f"run{k}" / "checkpoints" / "last.ckpt" for k in range(2)]
        env = dict(os.environ, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
        processes = [subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], env=env, stdout=subprocess.PIPE,
                                      text=True) for path in paths]
        rng = random.Random(0)
        saved = []
        for process in processes:
            assert process.stdout is not None
            saved.append(int(process.stdout.readline()))  # one whole save done
        for process in processes:
            time.sleep(rng.uniform(0.0, 0.3))  # each one killed somewhere in its loop of saves
            process.send_signal(signal.SIGKILL)
            process.wait()
        for path, first in zip(paths, saved):
            last = version_of(path)
            assert last >= first
            assert resume_checkpoint(path) == (path, None)
            if previous_path(path).exists():  # absent only while a write was in progress
                assert version_of(previous_path(path)) == last - 1
            leftovers = [p.name for p in path.parent.iterdir() if p.name not in ("last.ckpt", "last.prev.ckpt")]
            assert all(".tmp-" in name for name in leftovers)  # at most what the killed write had begun
            save(path, last + 1)  # the next write (another process) deletes what the killed one left
            assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
            assert version_of(path) == last + 1 and version_of(previous_path(path)) == last
        assert not [p for p in tmpdir.rglob("*") if p.is_file()]  # nothing went through $TMPDIR
    finally:
        unmount(mount)

"""On-disk cache entries shared by the cached prefix activations (`ham_lightning.data.feature_cache`): where an
entry lives (``<name>-<digest>.npy`` / ``.json`` / ``.lock``), whether it can be used, and building it under its
lock, written whole or not at all (`ham_lightning.disk`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ham_lightning.disk import LockHeld, atomic_file, exclusive, locked

_HASH_CHUNK = 1 << 24


class FeatureCacheWarning(UserWarning):
    """A cache file was found unusable (stale, truncated, corrupt) and is being rebuilt."""


def file_sha256(path: Path, limit: int | None = None) -> str:
    """sha256 of a file's bytes (all of them, or the first ``limit``), read in chunks."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            chunk = f.read(_HASH_CHUNK if remaining is None else min(_HASH_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


_ARCHIVE_HASHES: dict[tuple[str, int, int], str] = {}


def archive_stamp(path: Path) -> str:
    """What identifies an archive's content in a cache key: its sha256 (0.1 s for 100 MB), remembered per
    (path, size, modification time) in this process. Not the modification time itself: a copied or re-provisioned
    data folder with the same bytes must hit the same caches (it rebuilt every one, 3-4 minutes each)."""
    st = os.stat(path)
    where = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if where not in _ARCHIVE_HASHES:
        _ARCHIVE_HASHES[where] = file_sha256(Path(path))
    return _ARCHIVE_HASHES[where]


def key_digest(key: Mapping[str, Any]) -> str:
    """A short stable hash of a cache key (canonical JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CacheFiles:
    """The paths of one cache entry."""

    stem: Path

    @property
    def array(self) -> Path:
        return self.stem.with_name(self.stem.name + ".npy")

    @property
    def manifest(self) -> Path:
        return self.stem.with_name(self.stem.name + ".json")

    @property
    def lock(self) -> Path:
        return self.stem.with_name(self.stem.name + ".lock")


def cache_files(directory: str | os.PathLike[str], name: str, key: Mapping[str, Any]) -> CacheFiles:
    """Where the entry of ``key`` lives: ``directory/<name>-<digest>.*`` (``name`` made file-name safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "features"
    return CacheFiles(Path(directory).expanduser() / f"{safe}-{key_digest(key)}")


def check_cache(files: CacheFiles, key: Mapping[str, Any], verify_checksum: bool = True) -> str | None:
    """Why the entry at ``files`` cannot be used for ``key`` (None: it can). Missing files and no manifest at all
    give ``"missing"``."""
    if not files.manifest.is_file():
        return "missing" if not files.array.exists() else "it has no manifest (an interrupted build?)"
    try:
        manifest = json.loads(files.manifest.read_text())
        shape, dtype, size, checksum = (tuple(manifest["shape"]), np.dtype(manifest["dtype"]),
                                        int(manifest["file_bytes"]), manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its manifest {files.manifest.name} is unreadable ({type(err).__name__}: {err})"
    stored_key = manifest.get("key") if isinstance(manifest.get("key"), dict) else {}
    expected = json.loads(json.dumps(key, sort_keys=True, default=str))  # as the manifest stores it
    if stored_key != expected:
        changed = sorted(k for k in set(expected) | set(stored_key) if stored_key.get(k) != expected.get(k))
        return f"it is stale: its key differs in {changed or 'format'}"
    if not files.array.is_file():
        return "the manifest has no array file"
    actual = files.array.stat().st_size
    if actual != size:
        return f"the file is truncated or has the wrong size ({actual} bytes, the manifest says {size})"
    try:
        array = np.load(files.array, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        return f"the file cannot be read as .npy ({type(err).__name__}: {err})"
    if array.shape != shape or array.dtype != dtype:
        return f"the file holds {array.shape} {array.dtype}, the manifest says {shape} {dtype}"
    del array
    if verify_checksum and file_sha256(files.array) != checksum:
        return "its checksum does not match the manifest (the file was modified or is corrupt)"
    return None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files (``<stem>.tmp-<pid>.npy``, ``<stem>.json.tmp-<pid>``) that killed builds left in
    ``directory``: those of entries no build holds the lock of (a build holds it from start to end, so a file it
    is writing is never touched, whichever process runs it). The paths deleted."""
    removed: list[Path] = []
    stems: dict[str, list[Path]] = {}
    for tmp in directory.glob("*.tmp-*"):
        match = re.match(r"(.+?)(?:\.json)?\.tmp-\d+(?:\.npy)?$", tmp.name)
        if match:
            stems.setdefault(match.group(1), []).append(tmp)
    for stem, files in sorted(stems.items()):
        try:
            lock = exclusive(directory / f"{stem}.lock")
        except LockHeld:
            continue  # a build of this entry is running
        except OSError:
            continue  # a read-only cache folder: nothing can be deleted anyway
        try:
            for tmp in files:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        finally:
            lock.release()
    return removed


def open_or_build(
    entries: list[tuple[CacheFiles, Mapping[str, Any]]],
    build: Callable[[list[int], list[Path]], list[tuple[tuple[int, ...], str]]],
    verify_checksum: bool = True,
    info: Mapping[str, Any] | None = None,
) -> list[np.ndarray]:
    """Read-only memory maps of the cache ``entries`` (files, key), those missing or unusable built first.

    ``build(needed, tmp_paths)`` writes the arrays of entries ``needed`` (indices into ``entries``, one pass for
    all of them) as ``.npy`` to ``tmp_paths`` and returns their shapes and dtypes. Each file is moved in place and
    its manifest written only once the build succeeded, all under the entries' locks, so an interrupted or
    concurrent build never leaves a half-written entry that looks complete. ``info`` goes into the manifests
    (not the keys): what a reader of the folder wants to know.
    """
    for directory in sorted({files.array.parent for files, _ in entries}):
        if directory.is_dir():
            remove_stale_temporaries(directory)
    with contextlib.ExitStack() as stack:
        for lock in sorted({files.lock for files, _ in entries}):
            stack.enter_context(locked(lock))
        needed = []
        for i, (files, key) in enumerate(entries):
            reason = check_cache(files, key, verify_checksum)
            if reason is None:
                continue
            if reason != "missing":
                warnings.warn(f"Feature cache {files.array}: {reason}; rebuilding it.", FeatureCacheWarning,
                              stacklevel=3)
            # Holding the lock, nothing else writes this entry: what is there (a killed build's temporary
            # file included) is garbage.
            for stale in (files.manifest, files.array, *files.array.parent.glob(f"{files.stem.name}.tmp-*")):
                stale.unlink(missing_ok=True)
            needed.append(i)
        if needed:
            start = time.perf_counter()
            with contextlib.ExitStack() as writing:  # every array moved in place only once the build succeeded
                tmps = [writing.enter_context(atomic_file(entries[i][0].array)) for i in needed]
                results = build(needed, tmps)
            seconds = round(time.perf_counter() - start, 2)
            for i, (shape, dtype) in zip(needed, results):
                files, key = entries[i]
                manifest = {
                    "key": key, "shape": list(shape), "dtype": dtype, "file_bytes": files.array.stat().st_size,
                    "sha256": file_sha256(files.array), "build_seconds": seconds,
                    "built_with": [str(entries[j][0].array.name) for j in needed],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "info": dict(info or {}),
                }
                with atomic_file(files.manifest) as tmp_manifest:
                    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
        return [np.load(files.array, mmap_mode="r", allow_pickle=False) for files, _ in entries]

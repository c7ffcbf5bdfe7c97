"""Tiny-ImageNet from its official layout, as a folder or read straight from ``tiny-imagenet-200.zip``."""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..cache_entries import archive_stamp
from ..image_store import decode_many, is_image_file
from .base import DatasetReader, Split, SplitData, natural_key

FOLDER = "tiny-imagenet-200"
SIZE = (64, 64)
CHUNK = 4096  # images read and decoded at a time, to bound the encoded bytes held


class _Tree:
    """Read-only view of the data set's files, in a folder or a zip archive, by path relative to its top."""

    def __init__(self, location: Path, zip_prefix: str | None = None) -> None:
        self.location = location
        self.zip_prefix = zip_prefix

    @property
    def is_zip(self) -> bool:
        return self.zip_prefix is not None

    def files(self) -> list[str]:
        if self.is_zip:
            with zipfile.ZipFile(self.location) as archive:
                n = len(self.zip_prefix or "")
                return [m[n:] for m in archive.namelist() if m.startswith(self.zip_prefix or "") and not m.endswith("/")]
        out = []
        for dirpath, _, filenames in os.walk(self.location):
            rel = os.path.relpath(dirpath, self.location)
            out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in filenames]
        return out

    def read_text(self, rel: str) -> str:
        with self.opened() as read:
            return read(rel).decode("utf-8")

    @contextlib.contextmanager
    def opened(self) -> Iterator[Callable[[str], bytes]]:
        """A function reading one file's bytes, valid inside the ``with`` (the archive is opened once)."""
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.location) as archive:
                    yield lambda rel: archive.read(f"{self.zip_prefix}{rel}")
            else:
                yield lambda rel: (self.location / rel).read_bytes()
        except (KeyError, FileNotFoundError) as err:
            raise FileNotFoundError(f"tiny_imagenet: {err} (in {self.location}).") from err
        except zipfile.BadZipFile as err:
            raise ValueError(f"tiny_imagenet: {self.location} is a corrupt zip archive ({err}).") from err

    def describe(self, rel: str) -> str:
        return f"{self.location}:{self.zip_prefix}{rel}" if self.is_zip else str(self.location / rel)


class TinyImageNetReader(DatasetReader):
    """200 classes of 64x64 images; ``train/`` is the train split, ``val/`` the test split (official).

    Class indices follow the sorted wnids, as torchvision's ImageFolder over ``train/`` numbers them. All images
    are decoded once into memory (64x64; any other size is resized to it), optionally cached under ``cache_dir``.
    """

    name = "tiny_imagenet"
    layout = (
        f"{FOLDER}/{{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}}, as a "
        f"folder or as the distributed {FOLDER}.zip; ROOT may be the zip, the {FOLDER} folder, or a folder "
        "holding either"
    )

    def _scan(self) -> None:
        self.tree = self._locate()
        wnids = [line.strip() for line in self.tree.read_text("wnids.txt").splitlines() if line.strip()]
        if len(set(wnids)) != len(wnids):
            raise ValueError(f"tiny_imagenet: {self.tree.describe('wnids.txt')} lists a class twice.")
        self._set_classes(sorted(wnids))
        # Index both splits now (file names only, no decoding): a class without images or a val file missing
        # from the annotations fails while the scenario is built.
        files = self.tree.files()
        self._indices: dict[Split, tuple[list[str], np.ndarray]] = {
            "train": self._index("train", files), "test": self._index("test", files)}

    def _locate(self) -> _Tree:
        assert self.root is not None
        root = self.root
        if root.is_file():
            if not zipfile.is_zipfile(root):
                raise self.missing(f"{root} is a file but not a zip archive")
            return _Tree(root, self._zip_prefix(root))
        if (root / "wnids.txt").is_file():
            return _Tree(root)
        if (root / FOLDER / "wnids.txt").is_file():
            return _Tree(root / FOLDER)
        if (root / f"{FOLDER}.zip").is_file():
            return _Tree(root / f"{FOLDER}.zip", self._zip_prefix(root / f"{FOLDER}.zip"))
        raise self.missing(f"found neither {FOLDER}/wnids.txt nor {FOLDER}.zip under {root}")

    def _zip_prefix(self, path: Path) -> str:
        with zipfile.ZipFile(path) as archive:
            tops = [m[: -len("wnids.txt")] for m in archive.namelist() if m.endswith("wnids.txt")
                    and (m == "wnids.txt" or m.endswith("/wnids.txt"))]
        if not tops:
            raise self.missing(f"the archive {path} has no wnids.txt")
        return min(tops, key=len)

    @property
    def source(self) -> str:
        return self.tree.describe("")

    def _index(self, split: Split, files: list[str]) -> tuple[list[str], np.ndarray]:
        assert self.class_names is not None
        index = {wnid: i for i, wnid in enumerate(self.class_names)}
        if split == "train":
            by_class: dict[str, list[str]] = {wnid: [] for wnid in self.class_names}
            for rel in files:
                parts = rel.split("/")
                if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and is_image_file(parts[3]):
                    if parts[1] not in index:
                        raise ValueError(f"tiny_imagenet: {self.tree.describe(rel)} belongs to class {parts[1]}, "
                                         "which wnids.txt does not list.")
                    by_class[parts[1]].append(rel)
            empty = [wnid for wnid, rels in by_class.items() if not rels]
            if empty:
                raise ValueError(
                    f"tiny_imagenet: no training images for {len(empty)} class(es), e.g. "
                    f"{self.tree.describe(f'train/{empty[0]}/images/')}; every wnid needs train/<wnid>/images/*.JPEG."
                )
            rels = [r for wnid in self.class_names for r in sorted(by_class[wnid], key=natural_key)]
            labels = [index[r.split("/")[1]] for r in rels]
            return rels, np.asarray(labels, dtype=np.int64)
        if "val/val_annotations.txt" not in set(files):
            raise self.missing(f"{self.tree.describe('val/val_annotations.txt')} is missing")
        present = {rel for rel in files if rel.startswith("val/images/")}
        entries = []
        for n, line in enumerate(self.tree.read_text("val/val_annotations.txt").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(f"tiny_imagenet: line {n} of {self.tree.describe('val/val_annotations.txt')} "
                                 f"is not '<file>\\t<wnid>...' with a wnid from wnids.txt: {line!r}.")
            rel = f"val/images/{fields[0]}"
            if rel not in present:
                raise FileNotFoundError(f"tiny_imagenet: {self.tree.describe(rel)}, listed in "
                                        "val_annotations.txt, is missing.")
            entries.append((rel, index[fields[1]]))
        missing = sorted(set(self.class_names) - {self.class_names[label] for _, label in entries})
        if missing:
            raise ValueError(f"tiny_imagenet: val/val_annotations.txt lists no image of {len(missing)} class(es), "
                             f"e.g. {missing[:3]}; every wnid needs validation images (the test split).")
        entries.sort(key=lambda e: natural_key(e[0]))
        return [e[0] for e in entries], np.asarray([e[1] for e in entries], dtype=np.int64)

    def load(self, split: Split) -> SplitData:
        rels, labels = self._indices[split]
        positions = self._select(split, labels)
        rels = [rels[i] for i in positions]
        labels = labels[positions]
        names = [self.tree.describe(rel) for rel in rels]

        def decode() -> np.ndarray:
            out = np.empty((len(rels), SIZE[1], SIZE[0], 3), dtype=np.uint8)
            with self.tree.opened() as read:
                for start in range(0, len(rels), CHUNK):
                    stop = min(start + CHUNK, len(rels))
                    out[start:stop] = decode_many([read(r) for r in rels[start:stop]], names[start:stop], SIZE)
            return out

        def stamp() -> list[str | bytes]:
            """The zip's content hash, or the size and modification time of every selected file of a folder (a
            folder's own time does not change when an image inside it is replaced)."""
            if self.tree.is_zip:
                return [archive_stamp(self.tree.location)]
            stats = [os.stat(self.tree.location / r) for r in rels]
            return [f"{st.st_size}:{st.st_mtime_ns}" for st in stats]

        return SplitData(
            labels=labels, names=names, decode=decode,
            cache_parts=[self.name, split, str(self.tree.location.resolve()), f"{SIZE}"], cache_stamp=stamp,
        )

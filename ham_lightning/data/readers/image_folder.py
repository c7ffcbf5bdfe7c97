"""Generic class-per-folder data sets (``root/<class>/*``), and ImageNet-R which is one."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..cache_entries import archive_stamp
from ..image_store import ZipImageStore
from .base import DatasetReader, Split, SplitData, seeded_split, seeded_split_name
from .folders import (
    check_same_classes,
    class_dirs,
    presplit_dirs,
    read_split_file,
    scan_classes,
    zip_presplit,
)


class ImageFolderReader(DatasetReader):
    """``root/<class>/*`` split by ``split_file`` or a seeded per-class split, or pre-split ``train/`` ``test/``.

    Classes are the sorted folder names (torchvision's ImageFolder numbering). Images stay on disk and are decoded
    per item; at setup every file's header is checked (``verify_images``) so a bad file is named up front.
    """

    name = "image_folder"
    layout = (
        "ROOT/<class>/<image> (split per class with a seeded split, or by split_file), or pre-split "
        "ROOT/train/<class>/<image> and ROOT/test/<class>/<image>; ROOT may also be a zip holding train/ and "
        "test/ at its top or one folder down"
    )

    def _base(self) -> Path:
        assert self.root is not None
        return self.root

    def _scan(self) -> None:
        self.base = self._base()
        self._zip: dict[Split, tuple[list[str], np.ndarray]] | None = None
        if self.base.is_file():
            self._scan_zip()
            return
        if not self.base.is_dir():
            raise self.missing(f"{self.base} is not a folder")
        self._presplit = presplit_dirs(self.base) if self.options.split_file is None else None
        if self._presplit is not None:
            self.split = "folders"
            classes = check_same_classes(*self._presplit, dataset=self.name)
        else:
            self.split = "split_file" if self.options.split_file else seeded_split_name(self.options.test_fraction)
            classes = class_dirs(self.base)
        if not classes:
            raise self.missing(f"no class folders under {self.base}")
        self._set_classes(classes)
        self._splits: dict[Split, tuple[list[str], np.ndarray]] | None = None
        # Listing files is cheap next to decoding them: do it now, so that an empty class folder or a bad
        # split file fails while the scenario is built, not when training starts.
        self._index()

    def _scan_zip(self) -> None:
        """A zip read as it comes: pre-split ``train/`` ``test/`` class folders at its top or one folder down."""
        if not zipfile.is_zipfile(self.base):
            raise self.missing(f"{self.base} is not a folder (nor a zip archive)")
        if self.options.split_file:
            raise ValueError(f"{self.name}: split_file applies to a folder; {self.base} is a zip with its own "
                             "train/ and test/ split. Drop split_file, or extract the zip and point root at it.")
        try:
            prefix, found = zip_presplit(self.base)
        except FileNotFoundError as err:
            raise self.missing(str(err)) from err
        train, test = sorted(found["train"]), sorted(found["test"])
        if train != test:
            only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
            raise ValueError(f"{self.name}: {self.base}:{prefix}train/ and test/ must hold the same class folders; "
                             f"only in train/: {only_train[:10]}, only in test/: {only_test[:10]}.")
        self.split = "folders"
        self._set_classes(train)
        self._zip = {
            split: ([m for c in train for m in found[split][c]],
                    np.asarray([i for i, c in enumerate(train) for _ in found[split][c]], dtype=np.int64))
            for split in ("train", "test")
        }

    @property
    def source(self) -> str:
        return str(self.base)

    def _index(self) -> dict[Split, tuple[list[str], np.ndarray]]:
        if self._splits is not None:
            return self._splits
        assert self.class_names is not None
        if self._presplit is not None:
            train_dir, test_dir = self._presplit
            splits: dict[Split, tuple[list[str], np.ndarray]] = {
                "train": scan_classes(train_dir, self.class_names, self.name),
                "test": scan_classes(test_dir, self.class_names, self.name),
            }
        else:
            paths, labels = scan_classes(self.base, self.class_names, self.name)
            if self.options.split_file:
                train, test = self._from_split_file(paths)
            else:
                train, test = seeded_split(labels, self.options.test_fraction, self.options.split_seed)
            splits = {"train": ([paths[i] for i in train], labels[train]),
                      "test": ([paths[i] for i in test], labels[test])}
        self._splits = splits
        return splits

    def _from_split_file(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        assert self.options.split_file is not None
        position = {Path(p).relative_to(self.base).as_posix(): i for i, p in enumerate(paths)}
        train_rel, test_rel = read_split_file(self.options.split_file, self.base)
        unknown = [r for r in train_rel + (test_rel or []) if r not in position]
        if unknown:
            raise FileNotFoundError(
                f"{self.name}: split_file {self.options.split_file} lists {len(unknown)} image(s) not found under "
                f"{self.base}, e.g. {unknown[:3]}; paths must be <class>/<file> relative to {self.base}."
            )
        train = np.unique([position[r] for r in train_rel]).astype(np.int64)
        if test_rel is None:
            test = np.setdiff1d(np.arange(len(paths)), train)
        else:
            test = np.unique([position[r] for r in test_rel]).astype(np.int64)
            overlap = np.intersect1d(train, test)
            if len(overlap):
                raise ValueError(f"{self.name}: split_file {self.options.split_file} puts {len(overlap)} image(s) "
                                 f"in both train and test, e.g. {paths[overlap[0]]}.")
        if not len(train) or not len(test):
            raise ValueError(f"{self.name}: split_file {self.options.split_file} leaves the train or test split "
                             "empty.")
        return train, test

    def load(self, split: Split) -> SplitData:
        if self._zip is not None:
            return self._load_zip(split)
        paths, labels = self._index()[split]
        positions = self._select(split, labels)
        names = [paths[i] for i in positions]
        return SplitData(labels=labels[positions], names=names, groups=self.groups_of(names))

    def _load_zip(self, split: Split) -> SplitData:
        assert self._zip is not None
        members, labels = self._zip[split]
        positions = self._select(split, labels)
        members = [members[i] for i in positions]
        archive = self.base

        def store(cache_dir: object, cache_name: str, verify: bool) -> ZipImageStore:
            out = ZipImageStore(archive, members)
            if verify:
                out.verify()
            return out

        def stamp() -> list[str | bytes]:
            return [archive_stamp(archive)]

        return SplitData(labels=labels[positions], names=[f"{archive}:{m}" for m in members], store=store,
                         cache_parts=[self.name, split, str(archive.resolve())], cache_stamp=stamp,
                         groups=self.groups_of(members))

    def groups_of(self, names: list[str]) -> np.ndarray | None:
        """Near-duplicate groups of the images (``None``: every image stands alone); see `GTSRBReader`."""
        return None


class ImageNetRReader(ImageFolderReader):
    """ImageNet-R: ``imagenet-r/<wnid>/*`` (200 classes, 30,000 images), which has no official split.

    The split used is recorded: ``split_file`` (a user's fixed list, as CODA-Prompt / InfLoRA use), ``folders``
    (pre-split ``train/`` ``test/``, as LAMDA-PILOT uses) or ``seeded_80_20`` (per class, ``split_seed``).
    """

    name = "imagenet_r"
    layout = (
        "ROOT/imagenet-r/<wnid>/<image> (200 class folders; ROOT may be the imagenet-r folder itself) split by "
        "split_file or a seeded per-class 80/20 split, or pre-split ROOT/train/<wnid>/ and ROOT/test/<wnid>/"
    )

    def _base(self) -> Path:
        assert self.root is not None
        return self.root / "imagenet-r" if (self.root / "imagenet-r").is_dir() else self.root

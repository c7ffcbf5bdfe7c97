"""CUB-200-2011 from its official text files, or from pre-split ``train/`` ``test/`` folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DatasetReader, Split, SplitData
from .folders import check_same_classes, presplit_dirs, scan_classes

FOLDER = "CUB_200_2011"
OFFICIAL = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


class Cub200Reader(DatasetReader):
    """200 bird species; the official ``train_test_split.txt`` gives 5,994 train / 5,794 test images.

    Class ``k`` is label ``k + 1`` of ``image_class_labels.txt`` (names from ``classes.txt`` when present). With
    pre-split folders the classes are the sorted folder names. Images are decoded per item from disk.
    """

    name = "cub200"
    layout = (
        f"ROOT/{FOLDER}/{{images/<class>/<image>, images.txt, image_class_labels.txt, train_test_split.txt, "
        f"classes.txt}} (ROOT may be {FOLDER} itself), or pre-split ROOT/train/<class>/ and ROOT/test/<class>/"
    )

    def _scan(self) -> None:
        assert self.root is not None
        self._presplit: tuple[Path, Path] | None = None
        self._splits: dict[Split, tuple[list[str], np.ndarray]] = {}
        for folder in (self.root / FOLDER, self.root):
            if (folder / "images.txt").is_file():
                self.folder = folder
                self.split = "official"
                self._read_official()
                return
        for folder in (self.root, self.root / FOLDER):
            if folder.is_dir() and (presplit := presplit_dirs(folder)) is not None:
                self._presplit = presplit
                self.split = "folders"
                self._set_classes(check_same_classes(*presplit, dataset=self.name))
                assert self.class_names is not None
                self._splits = {split: scan_classes(directory, self.class_names, self.name)
                                for split, directory in zip(("train", "test"), presplit)}
                return
        raise self.missing(f"found neither {FOLDER}/images.txt nor train/ and test/ folders under {self.root}")

    def _table(self, name: str) -> dict[int, str]:
        path = self.folder / name
        if not path.is_file():
            raise self.missing(f"{path} is missing")
        table = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=1)
            if len(fields) != 2 or not fields[0].isdigit():
                raise ValueError(f"cub200: line {n} of {path} is not '<image id> <value>': {line!r}.")
            table[int(fields[0])] = fields[1].strip()
        return table

    def _read_official(self) -> None:
        images, labels, is_train = (self._table(name) for name in OFFICIAL)
        ids = sorted(images)
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
            lacking = [i for i in ids if i not in table]
            if lacking:
                raise ValueError(f"cub200: {self.folder / name} has no entry for {len(lacking)} image id(s) of "
                                 f"images.txt, e.g. {lacking[:3]}.")
        try:
            label_of = np.asarray([int(labels[i]) - 1 for i in ids], dtype=np.int64)
            train_of = np.asarray([int(is_train[i]) == 1 for i in ids], dtype=bool)
        except ValueError as err:
            raise ValueError(f"cub200: non-integer class label or split flag in {self.folder} ({err}).") from err
        if (self.folder / "classes.txt").is_file():
            classes = self._table("classes.txt")
            names = [classes[k] for k in sorted(classes)]
        else:  # the class folder of its first image names each class
            first: dict[int, str] = {}
            for i, label in zip(ids, label_of, strict=True):
                first.setdefault(int(label), images[i].split("/")[0])
            names = [first.get(k, str(k + 1)) for k in range(int(label_of.max()) + 1 if len(ids) else 0)]
        self._set_classes(names)
        if len(label_of) and (label_of.min() < 0 or label_of.max() >= self.num_classes):
            raise ValueError(f"cub200: image_class_labels.txt has labels outside 1..{self.num_classes}.")
        paths = [str(self.folder / "images" / images[i]) for i in ids]
        absent = [p for p in paths if not Path(p).is_file()]
        if absent:
            raise FileNotFoundError(f"cub200: {len(absent)} image(s) listed in images.txt are missing, "
                                    f"e.g. {absent[:3]}. Expected layout: {self.layout}")
        self._splits = {}
        for split, mask in (("train", train_of), ("test", ~train_of)):
            positions = np.flatnonzero(mask)
            split_labels = label_of[positions]
            empty = sorted(set(range(self.num_classes)) - set(split_labels.tolist()))
            if empty:
                raise ValueError(f"cub200: the official {split} split has no image of class(es) "
                                 f"{[names[k] for k in empty[:5]]}; check train_test_split.txt.")
            self._splits[split] = ([paths[i] for i in positions], split_labels)

    def load(self, split: Split) -> SplitData:
        paths, labels = self._splits[split]
        positions = self._select(split, labels)
        return SplitData(labels=labels[positions], names=[paths[i] for i in positions])

"""CIFAR-100 from the ``cifar-100-python`` pickles (torchvision's layout), read by torchvision's `CIFAR100`."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from .base import DatasetReader, Split, SplitData

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")


class _CIFAR100Files(CIFAR100):
    """torchvision's `CIFAR100` reading ``root/{train,test,meta}`` and checking that they exist, not their md5.

    torchvision re-hashes the official files on every construction; here the archive's md5 is checked once, when
    `Cifar100Reader.prepare` downloads it, so a copy extracted elsewhere (and the tests' small layouts) loads.
    """

    base_folder = ""  # root is the pickle folder itself
    train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in CIFAR100.train_list]
    test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in CIFAR100.test_list]
    meta: ClassVar[dict[str, str | None]] = {**CIFAR100.meta, "md5": None}


class Cifar100Reader(DatasetReader):
    """50,000 train / 10,000 test 32x32 images, 100 fine classes, the official split; decoded in memory."""

    name = "cifar100"
    layout = (
        "ROOT/cifar-100-python/{train,test,meta}, the python pickles of "
        f"{CIFAR100.url} extracted (ROOT may also be the cifar-100-python folder itself)"
    )

    def _scan(self) -> None:
        assert self.root is not None
        self.folder = self.root if (self.root / "meta").is_file() else self.root / FOLDER
        self._datasets: dict[str, CIFAR100] = {}
        if not (self.folder / "meta").is_file():
            if not self.options.download:
                raise self.missing(f"no {FOLDER}/meta under {self.root}; pass download=True to fetch it")
            # The class count is known without the files; the download happens in prepare().
            self.folder = self.root / FOLDER
            self.num_classes = 100
            return
        self._read_classes()

    def _read_classes(self) -> None:
        # torchvision reads the class names (meta) only with a split: the test split, kept for load("test").
        self._set_classes([str(n) for n in self._dataset("test").classes])

    def _dataset(self, split: Split) -> CIFAR100:
        if split not in self._datasets:
            try:
                self._datasets[split] = _CIFAR100Files(str(self.folder), train=split == "train")
            except Exception as err:  # a damaged pickle can fail with almost any exception type
                raise ValueError(
                    f"cifar100: torchvision's CIFAR100 could not read the {split} split from {self.folder} (files "
                    f"{split} and meta; {type(err).__name__}: {err}). They are not the CIFAR-100 python pickles: "
                    f"extract {CIFAR100.filename} ({CIFAR100.url}) again into {self.folder.parent}."
                ) from err
        return self._datasets[split]

    def prepare(self) -> None:
        """Fetch and extract the archive with torchvision's downloader (``download=True``) unless it is there.

        The archive's md5 is verified. On failure nothing is left behind: no partial archive, and no ``root``
        folder if this call created it.
        """
        if all((self.folder / f).is_file() for f in FILES) or not self.options.download:
            return
        assert self.root is not None
        root_existed = self.root.exists()
        archive = self.root / CIFAR100.filename
        archive_existed = archive.exists()
        try:
            download_and_extract_archive(CIFAR100.url, str(self.root), filename=CIFAR100.filename,
                                         md5=CIFAR100.tgz_md5)
        except Exception as err:  # URLError, socket errors, HTTP errors: all mean "fetch it yourself"
            if not archive_existed:
                archive.unlink(missing_ok=True)
            if not root_existed and self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()
            raise RuntimeError(
                f"cifar100: could not download {CIFAR100.url} ({type(err).__name__}: {err}); this machine may have "
                f"no network access. Download {CIFAR100.filename} elsewhere and extract it into {self.root}, so "
                f"that {self.root / FOLDER}/ holds train, test and meta."
            ) from err

    def load(self, split: Split) -> SplitData:
        for name in FILES:
            if not (self.folder / name).is_file():
                hint = "; with download=True, call prepare_data() first (Lightning's Trainer does)" if (
                    self.options.download) else ""
                raise self.missing(f"{self.folder / name} is missing{hint}")
        if self.class_names is None:
            self._read_classes()
        dataset = self._dataset(split)
        self._datasets.pop(split)  # decoded once: the datamodule keeps what it needs
        images, labels = dataset.data, np.asarray(dataset.targets, dtype=np.int64)
        if len(images) != len(labels):
            raise ValueError(f"cifar100: {self.folder / split} holds {len(images)} images but {len(labels)} labels.")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"cifar100: {self.folder / split} has fine_labels outside 0..{self.num_classes - 1}.")
        positions = self._select(split, labels)
        return SplitData(
            labels=labels[positions], names=[f"{self.folder / split}[{i}]" for i in positions],
            images=np.ascontiguousarray(images[positions]),
        )

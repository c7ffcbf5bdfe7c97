"""CIFAR-100 from the ``cifar-100-python`` pickles (torchvision's layout)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from .base import DatasetReader, Split, SplitData

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")


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
        if not (self.folder / "meta").is_file():
            if not self.options.download:
                raise self.missing(f"no {FOLDER}/meta under {self.root}; pass download=True to fetch it")
            # The class count is known without the files; the download happens in prepare().
            self.folder = self.root / FOLDER
            self.num_classes = 100
            return
        self._read_meta()

    def _read_meta(self) -> None:
        meta = self._unpickle(self.folder / "meta", "fine_label_names")
        # Python-2 pickles give str names; a copy re-pickled with bytes keys gives bytes names.
        self._set_classes([n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]])

    def prepare(self) -> None:
        """Fetch and extract the archive with torchvision's downloader (``download=True``) unless it is there.

        On failure nothing is left behind: no partial archive, and no ``root`` folder if this call created it.
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
            self._read_meta()
        entry = self._unpickle(self.folder / split, "data", "fine_labels")
        data, labels = np.asarray(entry["data"], dtype=np.uint8), np.asarray(entry["fine_labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise ValueError(
                f"cifar100: {self.folder / split} holds data of shape {data.shape} and {len(labels)} labels; "
                "expected N x 3072 (32x32 RGB, channel-major) and N labels."
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"cifar100: {self.folder / split} has fine_labels outside 0..{self.num_classes - 1}.")
        positions = self._select(split, labels)
        images = data[positions].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return SplitData(
            labels=labels[positions], names=[f"{self.folder / split}[{i}]" for i in positions],
            images=np.ascontiguousarray(images),
        )

    def _unpickle(self, path: Path, *keys: str) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception as err:  # a damaged pickle can fail with almost any exception type
            raise ValueError(
                f"cifar100: {path} is not a readable CIFAR-100 pickle ({type(err).__name__}: {err})."
            ) from err
        if not isinstance(entry, dict):
            raise ValueError(f"cifar100: {path} is not a CIFAR-100 pickle (expected a dict).")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        for key in keys:
            if key not in entry:
                raise ValueError(f"cifar100: {path} lacks the key {key!r} of the CIFAR-100 python pickles.")
        return entry

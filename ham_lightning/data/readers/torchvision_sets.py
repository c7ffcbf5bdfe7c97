"""GTSRB and DTD: a pre-split image folder (or zip) as shipped here, or the layout torchvision downloads.

Both read ``ROOT/{train,test}/<class>/<image>`` (a folder or a zip, as `ImageFolderReader`), or, when ROOT
holds what ``torchvision.datasets.GTSRB(root)`` / ``DTD(root)`` download, that layout through torchvision's own
classes (their file lists and labels), so users can fetch the data with torchvision and point ``root`` at it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .base import Split
from .image_folder import ImageFolderReader

_TRACK = re.compile(r"^(\d+)_\d+$")


class _TorchvisionLayout(ImageFolderReader):
    """An `ImageFolderReader` that first looks for the layout of a torchvision data set under ROOT."""

    torchvision_folder: str = ""

    def _scan(self) -> None:
        assert self.root is not None
        if self.root.is_dir() and (self.root / self.torchvision_folder).is_dir():
            self.base = self.root
            self._zip = None
            self._presplit = None
            splits, names = self._torchvision_splits(self.root)
            self._set_classes(names)
            self._splits = splits
            return
        super()._scan()

    def _torchvision_splits(self, root: Path) -> tuple[dict[Split, tuple[list[str], np.ndarray]], list[str]]:
        raise NotImplementedError


class GTSRBReader(_TorchvisionLayout):
    """German Traffic Sign Recognition Benchmark, 43 classes, official train/test split.

    Training images come in tracks of 30 frames of one physical sign (``<track>_<frame>.<ext>``): each track is
    one group, so a held-out part (``validation_fraction``) takes whole tracks, never frames of a track it
    trains on.
    """

    name = "gtsrb"
    layout = ("ROOT/{train,test}/<class>/<image> as a folder or a zip (the top or one folder down), or the layout "
              "torchvision.datasets.GTSRB(ROOT, download=True) writes: ROOT/gtsrb/GTSRB/Training/<class>/*.ppm")
    default_num_tasks = 10
    hflip = False  # mirrored signs are other signs (keep left / keep right)
    torchvision_folder = "gtsrb"

    def _torchvision_splits(self, root: Path) -> tuple[dict[Split, tuple[list[str], np.ndarray]], list[str]]:
        from torchvision.datasets import GTSRB

        splits: dict[Split, tuple[list[str], np.ndarray]] = {}
        for split in ("train", "test"):
            try:
                samples = GTSRB(str(root), split=split)._samples
            except (RuntimeError, FileNotFoundError) as err:
                raise self.missing(f"torchvision's GTSRB {split} split under {root}: {err}") from err
            splits[split] = ([s[0] for s in samples], np.asarray([s[1] for s in samples], dtype=np.int64))
        self.split = "official"
        return splits, [f"{c:02d}" for c in range(int(splits["train"][1].max()) + 1)]

    def groups_of(self, names: list[str]) -> np.ndarray | None:
        """One group per (class folder, track): ``<track>_<frame>`` file names; files that do not follow it
        stand alone."""
        ids: dict[tuple[str, str], int] = {}
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            path = Path(name.rsplit(":", 1)[-1])
            match = _TRACK.match(path.stem)
            key = (path.parent.name, match.group(1)) if match else (str(path), "")
            out[i] = ids.setdefault(key, len(ids))
        return out


class DTDReader(_TorchvisionLayout):
    """Describable Textures Dataset (47 classes; any subset as class folders).

    In torchvision's layout, partition 1 is used: its ``train`` and ``val`` lists train, its ``test`` list tests.
    """

    name = "dtd"
    layout = ("ROOT/{train,test}/<class>/<image> as a folder or a zip (the top or one folder down), or the layout "
              "torchvision.datasets.DTD(ROOT, download=True) writes: ROOT/dtd/dtd/{images,labels}/")
    default_num_tasks = 5
    torchvision_folder = "dtd"

    def _torchvision_splits(self, root: Path) -> tuple[dict[Split, tuple[list[str], np.ndarray]], list[str]]:
        from torchvision.datasets import DTD

        try:
            parts = {s: DTD(str(root), split=s, partition=1) for s in ("train", "val", "test")}
        except (RuntimeError, FileNotFoundError) as err:
            raise self.missing(f"torchvision's DTD under {root}: {err}") from err
        names = parts["train"].classes

        def files(*which: str) -> tuple[list[str], np.ndarray]:
            paths = [str(f) for w in which for f in parts[w]._image_files]
            labels = [names.index(parts[w].classes[label]) for w in which for label in parts[w]._labels]
            return paths, np.asarray(labels, dtype=np.int64)

        self.split = "official_partition1"
        return {"train": files("train", "val"), "test": files("test")}, names

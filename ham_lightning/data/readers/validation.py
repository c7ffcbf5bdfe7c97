"""Evaluation on held-out training images: choose hyper-parameters without ever reading the test split."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..image_store import SubsetImageStore
from .base import DatasetReader, Split, SplitData, seeded_split


class ValidationReader:
    """Wraps a reader so that ``train`` is its train split minus a seeded per-class ``fraction`` and ``test`` is
    that held-out part; the wrapped reader's test split is never loaded.

    Everything else (class names, defaults, layout) is the wrapped reader's. ``split`` names the held-out split,
    so decode and prefix caches never mix it up with the official one.
    """

    def __init__(self, reader: DatasetReader, fraction: float, seed: int) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1) (e.g. 0.2 holds out 20% of each class's "
                             f"training images), got {fraction}.")
        self.reader = reader
        self.fraction = fraction
        self.seed = seed
        self.split = f"validation_{round(100 * fraction)}_seed{seed}_of_{reader.split}_train"
        self._train: SplitData | None = None  # the wrapped train split, read (and decoded) once for both parts

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)

    def load(self, split: Split) -> SplitData:
        if self._train is None:
            self._train = self.reader.load("train")
            if self._train.decode is not None:
                self._train.decode = functools.cache(self._train.decode)
            if self._train.store is not None:
                build = functools.cache(self._train.store)
                self._train.store = lambda cache_dir, name, verify: build(cache_dir, f"{self.split}-train", verify)
        data = self._train
        train, held_out = seeded_split(data.labels, self.fraction, self.seed, groups=data.groups)
        return subset(data, train if split == "train" else held_out, tag=f"{self.split}:{split}")


def subset(data: SplitData, positions: np.ndarray, tag: str) -> SplitData:
    """The samples of ``data`` at ``positions`` (decoding, if lazy, stays lazy and decodes the parent once)."""
    decode, store = data.decode, data.store
    return SplitData(
        labels=data.labels[positions],
        names=[data.names[i] for i in positions],
        images=None if data.images is None else data.images[positions],
        decode=None if decode is None else (lambda: decode()[positions]),
        cache_parts=[*data.cache_parts, tag],
        cache_stamp=data.cache_stamp,
        store=None if store is None else (
            lambda cache_dir, name, verify: SubsetImageStore(store(cache_dir, name, verify), positions)),
        groups=None if data.groups is None else data.groups[positions],
    )


__all__ = ["ValidationReader", "subset"]

"""Readers for the data sets as users download them, by ``dataset`` name."""

from __future__ import annotations

import os

from .base import DatasetReader, ReadOptions, SplitData, first_per_class, seeded_split
from .cifar100 import Cifar100Reader
from .cub200 import Cub200Reader
from .digits import DigitsReader
from .image_folder import ImageFolderReader, ImageNetRReader
from .mixture import MixtureReader, Source
from .tiny_imagenet import TinyImageNetReader
from .torchvision_sets import DTDReader, GTSRBReader

READERS: dict[str, type[DatasetReader]] = {
    reader.name: reader
    for reader in (DigitsReader, Cifar100Reader, ImageNetRReader, Cub200Reader, TinyImageNetReader, ImageFolderReader,
                   GTSRBReader, DTDReader, MixtureReader)
}


def build_reader(
    dataset: str, root: str | os.PathLike[str] | None, options: ReadOptions | None = None
) -> DatasetReader:
    """The reader registered as ``dataset``, pointed at ``root``."""
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(READERS)}.")
    return READERS[dataset](root, options)


__all__ = [
    "READERS",
    "Cifar100Reader",
    "Cub200Reader",
    "DatasetReader",
    "DTDReader",
    "DigitsReader",
    "GTSRBReader",
    "ImageFolderReader",
    "ImageNetRReader",
    "MixtureReader",
    "ReadOptions",
    "Source",
    "SplitData",
    "TinyImageNetReader",
    "build_reader",
    "first_per_class",
    "seeded_split",
]

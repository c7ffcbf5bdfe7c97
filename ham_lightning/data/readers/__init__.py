"""Readers for the data sets as users download them, by ``dataset`` name: the `READERS` registry.

A new data set is one `DatasetReader` subclass with a ``name``, registered with `register_reader` (a decorator);
``ClassIncrementalDataModule(dataset=<name>)`` and ``--data.dataset <name>`` then read it.
"""

from __future__ import annotations

import os

from ham_lightning.core.registry import Registry

from .base import DatasetReader, ReadOptions, SplitData, first_per_class, seeded_split, spread_per_class
from .cifar100 import Cifar100Reader
from .cub200 import Cub200Reader
from .digits import DigitsReader
from .image_folder import ImageFolderReader, ImageNetRReader
from .mixture import MixtureReader, Source
from .tiny_imagenet import TinyImageNetReader
from .torchvision_sets import DTDReader, GTSRBReader

#: ``dataset`` name -> `DatasetReader` subclass (a read-only mapping; `register_reader` adds to it).
READERS: Registry[type[DatasetReader]] = Registry(
    "dataset", how="@register_reader on a DatasetReader subclass with a `name`")


def register_reader(reader: type[DatasetReader]) -> type[DatasetReader]:
    """Class decorator: make ``reader`` the reader of ``dataset=reader.name``; a name already taken is refused."""
    if not (isinstance(reader, type) and issubclass(reader, DatasetReader)):
        raise TypeError(f"register_reader decorates a DatasetReader subclass, got {reader!r}")
    return READERS.register(reader.name, reader)


for _reader in (DigitsReader, Cifar100Reader, ImageNetRReader, Cub200Reader, TinyImageNetReader, ImageFolderReader,
                GTSRBReader, DTDReader, MixtureReader):
    register_reader(_reader)
del _reader


def build_reader(
    dataset: str, root: str | os.PathLike[str] | None, options: ReadOptions | None = None
) -> DatasetReader:
    """The reader registered as ``dataset``, pointed at ``root``."""
    return READERS.create(READERS.check(dataset, "dataset"), root, options)


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
    "register_reader",
    "first_per_class",
    "seeded_split",
    "spread_per_class",
]

"""What every data set reader provides, and the split helpers they share.

A reader is built cheaply (it finds the layout and the class list, so a scenario knows its class count before
any image is read) and then loads one split at a time as labels plus either decoded images or file paths.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from ..image_store import (
    FileImageStore,
    ImageStore,
    TensorImageStore,
    cached_array,
    fingerprint,
    verify_image_files,
)

Split = Literal["train", "test"]
#: How a per-class cap picks its images: the first N in reader order, or N spread evenly over the class.
LimitMode = Literal["first", "spread"]


@dataclass(frozen=True)
class ReadOptions:
    """Reader settings that come from the datamodule."""

    split_file: str | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    limit_per_class_train: int | None = None
    limit_per_class_test: int | None = None
    limit_mode: LimitMode = "first"
    download: bool = False
    verify_images: bool = True
    #: The sources of a mixed-domain scenario (``dataset="mixture"``) and the order of their tasks.
    sources: tuple[Any, ...] = ()
    domain_order: str = "interleaved"
    #: Seed of per-source class selections (the scenario's seed).
    class_seed: int = 1993

    def __post_init__(self) -> None:
        if self.limit_mode not in PER_CLASS_LIMITS:
            raise ValueError(f"limit_mode must be one of {sorted(PER_CLASS_LIMITS)} (how limit_per_class_train/test "
                             f"pick a class's images), got {self.limit_mode!r}.")

    def limit(self, split: Split) -> int | None:
        return self.limit_per_class_train if split == "train" else self.limit_per_class_test


@dataclass
class SplitData:
    """One split as a reader delivers it: original class labels and where the images come from.

    Exactly one way to get pixels: ``images`` (already an ``N x H x W x 3`` uint8 array), ``decode`` (a function
    returning that array, so it can be cached), ``store`` (a function ``(cache_dir, cache_name, verify)`` returning
    an `ImageStore`: members of a zip, or several sources), or none (``names`` are file paths decoded per item).
    ``cache_parts`` (and ``cache_stamp()``, called only when a cache is used) identify what ``decode`` or
    ``store`` reads. ``groups`` (optional, one id per sample) marks near-duplicates, such as the frames of one
    GTSRB track, that a held-out split must never separate.
    """

    labels: np.ndarray
    names: list[str]
    images: np.ndarray | None = None
    decode: Callable[[], np.ndarray] | None = None
    cache_parts: list[str | bytes] = field(default_factory=list)
    cache_stamp: Callable[[], list[str | bytes]] | None = None
    store: Callable[[str | os.PathLike[str] | None, str, bool], ImageStore] | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.names):
            raise ValueError(f"{len(self.labels)} labels for {len(self.names)} images.")
        if self.images is not None and len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images for {len(self.labels)} labels.")
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)
            if len(self.groups) != len(self.labels):
                raise ValueError(f"{len(self.groups)} group ids for {len(self.labels)} labels.")

    @property
    def in_memory(self) -> bool:
        return self.images is not None or self.decode is not None

    def to_store(self, cache_dir: str | os.PathLike[str] | None, cache_name: str, verify: bool) -> ImageStore:
        """Decode (or load from the cache) in-memory splits; check file-backed ones' headers if ``verify``."""
        if self.images is not None:
            return TensorImageStore(self.images)
        if self.store is not None:
            return self.store(cache_dir, cache_name, verify)
        if self.decode is not None:
            if cache_dir is None:
                return TensorImageStore(self.decode())
            stamp = self.cache_stamp() if self.cache_stamp is not None else []
            key = fingerprint([*self.cache_parts, *stamp, *self.names, self.labels.tobytes()])
            return TensorImageStore(cached_array(cache_dir, f"{cache_name}-{key}", self.decode))
        if verify:
            verify_image_files(self.names)
        return FileImageStore(self.names)


@dataclass(frozen=True)
class TaskPlan:
    """A scenario's task structure imposed by its reader: ``class_order[k]`` is the original class that becomes
    global class ``k``, task ``t`` owns the next ``sizes[t]`` global classes, ``domains[t]`` names its source."""

    class_order: list[int]
    sizes: list[int]
    domains: list[str]


class DatasetReader(ABC):
    """Finds a data set on disk and reads its train and test splits.

    Subclasses set the class attributes, find the layout and class names in `_scan`, and implement `load`.
    """

    name: ClassVar[str]
    #: The on-disk layout, shown in every error about a missing or malformed data set.
    layout: ClassVar[str]
    needs_root: ClassVar[bool] = True
    default_image_size: ClassVar[int] = 224
    default_num_tasks: ClassVar[int] = 10
    default_crop_pct: ClassVar[float | None] = None
    train_crop: ClassVar[str] = "resized"
    hflip: ClassVar[bool] = True

    def __init__(self, root: str | os.PathLike[str] | None, options: ReadOptions | None = None) -> None:
        self.options = options or ReadOptions()
        if root is None and self.needs_root:
            raise ValueError(f"dataset={self.name!r} needs root, the folder that holds it. Expected layout: "
                             f"{self.layout}")
        self.root = Path(root).expanduser() if root is not None else None
        if self.root is not None and self.needs_root and not self.root.exists() and not self.options.download:
            raise self.missing(f"root {self.root} does not exist")
        #: Class names in the data set's own (natural) order; None until loaded when a download is pending.
        self.class_names: list[str] | None = None
        self.num_classes: int = 0
        #: Which train/test split is used: official, split_file, folders or seeded_<train>_<test>.
        self.split: str = "official"
        self._scan()

    @abstractmethod
    def _scan(self) -> None:
        """Find the layout and set ``class_names``, ``num_classes`` and ``split``; raise if it is not there."""

    @abstractmethod
    def load(self, split: Split) -> SplitData:
        """Read one split (labels are original class indices, ``0..num_classes-1``)."""

    def prepare(self) -> None:  # noqa: B027 - optional hook, most readers have nothing to download
        """Download what is missing where the reader can (``download=True``); by default nothing to do."""

    @property
    def source(self) -> str:
        """The resolved location of the data (for hyper-parameters and cache keys)."""
        return str(self.root) if self.root is not None else self.name

    def missing(self, what: str) -> FileNotFoundError:
        return FileNotFoundError(f"{self.name}: {what}. Expected layout: {self.layout}")

    def _set_classes(self, names: Sequence[str]) -> None:
        if not names:
            raise self.missing(f"no classes found under {self.root}")
        self.class_names = list(names)
        self.num_classes = len(names)

    def task_plan(self, num_tasks: int | None, seed: int) -> TaskPlan | None:
        """The class order and task sizes a reader imposes (a mixed-domain scenario: each task from one source),
        or None: the datamodule's ``class_order``, ``num_tasks``, ``increment`` and ``initial_classes`` decide."""
        return None

    def _select(self, split: Split, labels: np.ndarray) -> np.ndarray:
        """Positions kept after the per-class cap of ``split`` (``limit_mode``: the first N of each class in reader
        order, or N spread over it), in reader order."""
        return PER_CLASS_LIMITS[self.options.limit_mode](labels, self.options.limit(split))


def _per_class(labels: np.ndarray, limit: int | None,
               take: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Positions kept by ``take(class_positions, limit)`` for every class, in their original order (all if None)."""
    labels = np.asarray(labels)
    if limit is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        keep[take(np.flatnonzero(labels == cls), limit)] = True
    return np.flatnonzero(keep)


def first_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Positions of the first ``limit`` samples of every class, in their original order (all if None)."""
    return _per_class(labels, limit, lambda idx, n: idx[:n])


def spread_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Positions of ``limit`` samples of every class evenly spaced over its samples (first and last included), in
    their original order (all if None). Where a class's files come in runs of near-duplicates (GTSRB's tracks of 30
    frames of one sign), the first N are a few runs; spread, the same N cover all of them."""
    return _per_class(labels, limit, lambda idx, n: idx if len(idx) <= n
                      else idx[np.linspace(0, len(idx) - 1, n).round().astype(int)])


#: The per-class caps by ``limit_mode``.
PER_CLASS_LIMITS: dict[str, Callable[[np.ndarray, int | None], np.ndarray]] = {
    "first": first_per_class, "spread": spread_per_class}


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int,
                 groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: ``round(n * test_fraction)`` random samples of each class go to test.

    Every class with at least two samples keeps one in each split. With ``groups`` (an id per sample), whole
    groups move: a class's groups are shuffled and taken until the test part reaches ``round(n * test_fraction)``
    samples (at least one group; one group is always left to train when a class has two or more). Positions
    come back sorted, so the readers' order (and "the first N per class") survives the split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    test = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = int(round(len(members) * test_fraction))
        if groups is None:
            if len(members) >= 2:
                n_test = min(max(n_test, 1), len(members) - 1)
            test.append(rng.permutation(members)[:n_test])
            continue
        member_groups = np.asarray(groups)[members]
        unique = np.unique(member_groups)
        if len(unique) < 2:
            continue
        taken: list[np.ndarray] = []
        count = 0
        for g in rng.permutation(unique)[: len(unique) - 1]:
            if count and count + (member_groups == g).sum() / 2 > n_test:
                break
            taken.append(members[member_groups == g])
            count += len(taken[-1])
        test.append(np.concatenate(taken))
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def seeded_split_name(test_fraction: float) -> str:
    """``seeded_80_20`` for ``test_fraction=0.2``."""
    test = round(100 * test_fraction)
    return f"seeded_{100 - test}_{test}"


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders ``img_2`` before ``img_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]

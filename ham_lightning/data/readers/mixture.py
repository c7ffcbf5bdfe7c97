"""A mixed-domain scenario: several data sets in one class space, each task's classes from one of them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from ..image_store import ConcatImageStore, ImageStore, SubsetImageStore
from ..task_split import even_sizes
from .base import DatasetReader, LimitMode, Split, SplitData, TaskPlan

DomainOrder = Literal["interleaved", "blocked"]


@dataclass(frozen=True)
class Source:
    """One domain of a mixture: a registered ``dataset`` at ``root``; ``classes`` keeps the first N classes of
    the data set's seed order (``np.random.RandomState(seed).permutation``); ``name`` labels it in results
    (default: the dataset name); per-class image caps (and ``limit_mode``) override the scenario's."""

    dataset: str
    root: str | None = None
    classes: int | None = None
    name: str | None = None
    limit_per_class_train: int | None = None
    limit_per_class_test: int | None = None
    limit_mode: LimitMode | None = None

    @classmethod
    def coerce(cls, value: Source | Mapping[str, Any]) -> Source:
        if isinstance(value, Source):
            return value
        if not isinstance(value, Mapping) or "dataset" not in value:
            raise ValueError(f"a mixture source must be a mapping with at least 'dataset' (and usually 'root'), "
                             f"e.g. {{dataset: gtsrb, root: data/gtsrb.zip, classes: 20}}; got {value!r}.")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in mixture source {dict(value)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}.")
        return cls(**dict(value))

    @property
    def label(self) -> str:
        return self.name or self.dataset


class MixtureReader(DatasetReader):
    """Several sources read by their own readers, their (selected) classes concatenated in source order.

    Tasks never mix sources: `task_plan` gives each source a share of the tasks in proportion to its classes
    (at least one each), cuts each source's classes (in seed order) into its tasks with sizes that differ by at
    most one, and orders the tasks interleaved by the seed (``domain_order="interleaved"``) or source by source
    (``"blocked"``). Every image is decoded as RGB; the scenario's transforms bring all to one size.
    """

    name = "mixture"
    layout = ("no root: data.sources lists the data sets, e.g. [{dataset: gtsrb, root: data/gtsrb.zip}, "
              "{dataset: tiny_imagenet, root: data/tiny-imagenet-200.zip, classes: 100}]")
    needs_root = False
    default_num_tasks = 10

    def _scan(self) -> None:
        from . import build_reader  # the registry lives in the package

        sources = [Source.coerce(s) for s in self.options.sources]
        if len(sources) < 1:
            raise ValueError("dataset='mixture' needs data.sources: a list of {dataset, root, classes?, name?}.")
        labels = [s.label for s in sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"mixture sources need distinct names, got {labels}; set 'name' on repeated data sets.")
        if any(s.dataset == self.name for s in sources):
            raise ValueError("a mixture source cannot itself be a mixture.")
        self.sources = sources
        self.readers: list[DatasetReader] = []
        self.selected: list[np.ndarray] = []  # original class indices kept, in the source's seed order
        names: list[str] = []
        for source in sources:
            options = replace(self.options, sources=(),
                              limit_per_class_train=source.limit_per_class_train or self.options.limit_per_class_train,
                              limit_per_class_test=source.limit_per_class_test or self.options.limit_per_class_test,
                              limit_mode=source.limit_mode or self.options.limit_mode)
            reader = build_reader(source.dataset, source.root, options)
            order = np.random.RandomState(self.options.class_seed).permutation(reader.num_classes)
            if source.classes is not None:
                if not 1 <= source.classes <= reader.num_classes:
                    raise ValueError(f"mixture source {source.label}: classes={source.classes} is not in "
                                     f"1..{reader.num_classes} (the classes of {source.dataset}).")
                order = order[: source.classes]
            self.readers.append(reader)
            self.selected.append(order)
            names += [f"{source.label}/{reader.class_names[c]}" for c in np.sort(order)]  # type: ignore[index]
        self.offsets = np.cumsum([0] + [len(s) for s in self.selected])
        self.hflip = all(r.hflip for r in self.readers)  # type: ignore[misc]
        self.split = "+".join(f"{s.label}:{r.split}" for s, r in zip(sources, self.readers))
        self._set_classes(names)

    @property
    def source(self) -> str:
        return "mixture(" + ", ".join(f"{s.label}={r.source}" for s, r in zip(self.sources, self.readers)) + ")"

    @property
    def domains(self) -> list[str]:
        return [s.label for s in self.sources]

    def task_plan(self, num_tasks: int | None, seed: int) -> TaskPlan:
        counts = [len(s) for s in self.selected]
        total = sum(counts)
        num_tasks = num_tasks or min(self.default_num_tasks, total)
        if num_tasks == 1:  # joint training: one task of every class (the upper bound of a comparison)
            return TaskPlan(class_order=list(range(total)), sizes=[total], domains=["+".join(self.domains)])
        if not len(counts) <= num_tasks <= total:
            raise ValueError(f"a mixture of {len(counts)} sources ({total} classes) needs 1 (joint) or between {len(counts)} and "
                             f"{total} tasks (each task holds classes of one source), got num_tasks={num_tasks}.")
        shares = proportional_shares(counts, num_tasks)
        chunks: list[list[list[int]]] = []
        for k, (selected, share) in enumerate(zip(self.selected, shares)):
            local = self.offsets[k] + np.searchsorted(np.sort(selected), selected)  # mixture indices, seed order
            cuts = np.cumsum([0] + even_sizes(len(local), share))
            chunks.append([local[a:b].tolist() for a, b in zip(cuts[:-1], cuts[1:])])
        sequence = [k for k, share in enumerate(shares) for _ in range(share)]
        if self.options.domain_order == "interleaved":
            sequence = np.random.RandomState(seed).permutation(sequence).tolist()
        elif self.options.domain_order != "blocked":
            raise ValueError(f"domain_order must be 'interleaved' or 'blocked', got {self.options.domain_order!r}.")
        taken = [0] * len(counts)
        order: list[int] = []
        sizes: list[int] = []
        domains: list[str] = []
        for k in sequence:
            classes = chunks[k][taken[k]]
            taken[k] += 1
            order += classes
            sizes.append(len(classes))
            domains.append(self.sources[k].label)
        return TaskPlan(class_order=order, sizes=sizes, domains=domains)

    def load(self, split: Split) -> SplitData:
        parts: list[tuple[SplitData, np.ndarray]] = []
        labels: list[np.ndarray] = []
        names: list[str] = []
        groups: list[np.ndarray] = []
        next_group = 0
        for k, (reader, selected) in enumerate(zip(self.readers, self.selected)):
            data = reader.load(split)
            sorted_sel = np.sort(selected)
            keep = np.flatnonzero(np.isin(data.labels, sorted_sel))
            parts.append((data, keep))
            labels.append(self.offsets[k] + np.searchsorted(sorted_sel, data.labels[keep]))
            names += [data.names[i] for i in keep]
            part_groups = data.groups[keep] if data.groups is not None else np.arange(len(keep))
            groups.append(part_groups + next_group)
            next_group += int(part_groups.max()) + 1 if len(part_groups) else 0
        labels_all = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
        source_names = [s.label for s in self.sources]

        def store(cache_dir: str | os.PathLike[str] | None, cache_name: str, verify: bool) -> ImageStore:
            return ConcatImageStore([
                SubsetImageStore(data.to_store(cache_dir, f"{cache_name}-{label}", verify), keep)
                for (data, keep), label in zip(parts, source_names)])

        def stamp() -> list[str | bytes]:
            out: list[str | bytes] = []
            for data, _ in parts:
                if data.cache_stamp is not None:
                    out += data.cache_stamp()
                elif data.images is None and data.decode is None and data.store is None:
                    out += [f"{st.st_size}:{st.st_mtime_ns}" for st in (os.stat(n) for n in data.names)]
            return out

        cache_parts: list[str | bytes] = [self.name, split]
        for (data, _), label in zip(parts, source_names):
            cache_parts += [label, *data.cache_parts]
            if data.images is not None:  # an in-memory source (digits): its pixels are its identity
                cache_parts.append(hashlib.sha256(np.ascontiguousarray(data.images).data).hexdigest())
        return SplitData(labels=labels_all, names=names, store=store, cache_parts=cache_parts, cache_stamp=stamp,
                         groups=np.concatenate(groups) if groups else None)


def proportional_shares(counts: Sequence[int], total: int) -> list[int]:
    """``total`` tasks shared among sources in proportion to ``counts`` (largest remainder), each at least one and
    at most its class count."""
    counts = list(counts)
    shares = [1] * len(counts)
    for _ in range(total - len(counts)):
        # give the next task to the source furthest below its proportional share that can still take one
        deficit = [c / sum(counts) * total - s if s < c else -np.inf for c, s in zip(counts, shares)]
        shares[int(np.argmax(deficit))] += 1
    return shares

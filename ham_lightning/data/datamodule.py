"""`ClassIncrementalDataModule`: a data set as users have it, cut into a sequence of class-incremental tasks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from .class_order import DEFAULT_SEED, resolve_class_order
from .feature_cache import (
    CachedFeatures,
    CachedTaskDataset,
    LazyImageStore,
    PrefixCacheConfig,
    split_features,
)
from .image_store import ImageStore
from .readers import READERS, ReadOptions, build_reader
from .readers.base import Split, SplitData
from .readers.validation import ValidationReader
from .sampler import task_sampler, task_seed
from .scenario_checks import check_positive, check_scenario
from .task_dataset import TaskDataset
from .task_split import task_ranges, task_sizes
from .transforms import build_transform, resolve_data_config


@dataclass
class _LoadedSplit:
    store: ImageStore
    labels: torch.Tensor  # global class index per image of the store
    task_indices: list[np.ndarray]  # positions in the store of each task's samples
    features: CachedFeatures | None = None  # cached prefix activations, with a prefix cache


class ClassIncrementalDataModule(pl.LightningDataModule):
    """Turns a data set into ``num_tasks`` class-incremental tasks and serves them to the HAM plug-in.

    Implements `ham_lightning.TaskProtocol`: ``num_tasks``, ``num_classes`` (known right after ``__init__``),
    ``current_task``, ``set_task(t)``, ``task_classes(t)``, ``train_dataloader()`` (the current task),
    ``test_dataloader()`` (one loader per task ``0..current_task``). Labels are global class indices after the
    class order is applied; task ``t`` owns a contiguous range of them. The test split is the evaluation set, as
    in the continual-learning literature, so ``val_dataloader()`` returns the same loaders as ``test_dataloader()``.

    Args:
        dataset: ``digits`` (default, built in), ``cifar100``, ``imagenet_r``, ``cub200``, ``tiny_imagenet``,
            ``image_folder``. See docs/data.md for each layout.
        root: where the data set is (a folder, or for Tiny-ImageNet the zip); unused by ``digits``.
        num_tasks: number of tasks (default: 5 for ``digits``, 10 otherwise, unless ``increment`` is given).
        increment: classes per task after the first.
        initial_classes: classes of the first task (default: ``increment``, or an equal share).
        class_order: ``"seed"`` (``np.random.seed(seed); np.random.permutation(C)``, PyCIL's), ``"natural"``,
            or an explicit permutation of ``0..C-1``.
        seed: seed of the class order and of every task's shuffling and augmentation.
        batch_size: training batch size. eval_batch_size: test batch size (default ``batch_size``).
        num_workers: loader worker processes (0: load in the main process).
        pin_memory: pin batches for faster host-to-GPU copies (default: when CUDA is available).
        backbone: a timm model name whose data config gives image size, mean, std, interpolation and crop_pct.
        image_size, mean, std, interpolation, crop_pct: override the backbone's values (defaults: ImageNet
            mean/std, bicubic, crop_pct 0.875, the data set's size: 32 for ``digits``, 224 otherwise).
        augment: train-time augmentation (random crop + horizontal flip); False uses the eval transform.
        train_crop: ``"resized"`` (RandomResizedCrop) or ``"pad"`` (pad-and-crop); default per data set.
        hflip: random horizontal flips at train time (default per data set; off for ``digits``).
        epochs_per_task: epochs of each task when one long ``fit`` runs the whole sequence; the HAM callback
            reads it to mark task boundaries.
        split_file: a fixed train/test list for folder data sets (ImageNet-R, image_folder); see docs/data.md.
        test_fraction, split_seed: the seeded per-class split used where a data set has no official one.
        validation_fraction: hold out this seeded fraction of every class's training images (seed ``split_seed``)
            and evaluate on it instead of the test split, which is then never read: for choosing
            hyper-parameters (docs/results.md, "Ablations").
        limit_per_class_train, limit_per_class_test: keep only N images of every class (quick runs, CPU budgets).
        limit_mode: which N: ``"first"`` in reader order, or ``"spread"`` evenly over the class's images (GTSRB's
            tracks: the first 100 of a class are as few as 4 signs; spread, every track; docs/data.md).
        cache_dir: where decoded in-memory data sets are cached as ``.npy`` (None: no disk cache).
        download: fetch the data set where a downloader exists (CIFAR-100) and the network allows.
        verify_images: at setup, open every image file's header so a corrupt file is named before training.
        prefix_cache: a `PrefixCacheConfig` (or a dict of its fields): loaders then yield ``({"prefix": h}, y)``,
            ``h`` the frozen prefix's activations read from an on-disk cache built once (docs/data.md); the
            transforms follow its backbone unless ``backbone`` is given.
        sources: with ``dataset="mixture"``, the data sets of a mixed-domain scenario, each a mapping
            ``{dataset, root, classes?, name?, limit_per_class_train?, limit_per_class_test?, limit_mode?}``:
            tasks never mix sources, each source gets a share of the tasks in proportion to its classes
            (docs/data.md).
        domain_order: ``"interleaved"`` (the sources' tasks shuffled by ``seed``) or ``"blocked"`` (source by
            source, in the order given).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        num_tasks: int | None = None,
        increment: int | None = None,
        initial_classes: int | None = None,
        class_order: Literal["seed", "natural"] | list[int] = "seed",
        seed: int = DEFAULT_SEED,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        backbone: str | None = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: Literal["bicubic", "bilinear", "nearest"] | None = None,
        crop_pct: float | None = None,
        augment: bool = True,
        train_crop: Literal["resized", "pad"] | None = None,
        hflip: bool | None = None,
        epochs_per_task: int | None = None,
        split_file: str | None = None,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        validation_fraction: float | None = None,
        limit_per_class_train: int | None = None,
        limit_per_class_test: int | None = None,
        limit_mode: Literal["first", "spread"] = "first",
        cache_dir: str | None = None,
        download: bool = False,
        verify_images: bool = True,
        prefix_cache: PrefixCacheConfig | dict[str, Any] | None = None,
        sources: list[dict[str, Any]] | None = None,
        domain_order: Literal["interleaved", "blocked"] = "interleaved",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_positive(batch_size=batch_size, eval_batch_size=eval_batch_size, epochs_per_task=epochs_per_task,
                        limit_per_class_train=limit_per_class_train, limit_per_class_test=limit_per_class_test)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        if dataset not in READERS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(READERS)}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in 0..2**32-1 (NumPy's legacy seeding), got {seed!r}.")

        self.dataset = dataset
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.epochs_per_task = epochs_per_task
        self.cache_dir = cache_dir
        self.verify_images = verify_images

        self._reader = build_reader(dataset, root, ReadOptions(
            split_file=split_file, test_fraction=test_fraction, split_seed=split_seed,
            limit_per_class_train=limit_per_class_train, limit_per_class_test=limit_per_class_test,
            limit_mode=limit_mode, download=download, verify_images=verify_images, sources=tuple(sources or ()),
            domain_order=domain_order, class_seed=int(seed),
        ))
        if sources and dataset != "mixture":
            raise ValueError(f"data.sources is for dataset='mixture', not {dataset!r}; drop sources or set "
                             "dataset: mixture.")
        if validation_fraction is not None:
            self._reader = ValidationReader(self._reader, validation_fraction, split_seed)  # type: ignore[assignment]
        self.num_classes: int = self._reader.num_classes
        if num_tasks is None and increment is None:
            num_tasks = min(self._reader.default_num_tasks, self.num_classes)
        plan = self._reader.task_plan(num_tasks, seed)
        #: The source (domain) of every task in a mixed-domain scenario, else None.
        self.task_domains: list[str] | None = None
        if plan is not None:
            if increment is not None or initial_classes is not None or class_order != "seed":
                raise ValueError(f"dataset={dataset!r} decides its own class order and task sizes (each task from "
                                 "one source, in proportion to its classes): drop increment, initial_classes and "
                                 "class_order, and set num_tasks (and domain_order).")
            self.task_sizes: list[int] = list(plan.sizes)
            self.class_order: list[int] = list(plan.class_order)
            self.task_domains = list(plan.domains)
        else:
            check_scenario(dataset, root, self.num_classes, self._reader.class_names, num_tasks, increment,
                           initial_classes)
            self.task_sizes = task_sizes(self.num_classes, num_tasks, increment, initial_classes)
            #: ``class_order[k]`` is the original class that becomes global class ``k``.
            self.class_order = resolve_class_order(class_order, self.num_classes, seed)
        self.num_tasks: int = len(self.task_sizes)
        self._ranges = task_ranges(self.task_sizes)
        self._global_of = np.empty(self.num_classes, dtype=np.int64)
        self._global_of[self.class_order] = np.arange(self.num_classes)

        self.prefix_cache = None if prefix_cache is None else PrefixCacheConfig.coerce(prefix_cache)
        if self.prefix_cache is not None and self.prefix_cache.adapt_from is None:
            raise ValueError("prefix_cache.adapt_from is not set: set it to the model's ham.adapt_from (from the "
                             "command line, --model.ham.adapt_from sets both).")
        if self.prefix_cache is not None:
            backbone = backbone or self.prefix_cache.backbone
            if not augment and self.prefix_cache.views > 1:
                raise ValueError(f"prefix_cache.views={self.prefix_cache.views} with augment=False would cache "
                                 "identical views; set views=1 or augment=True.")

        reader = self._reader
        self.data_config = resolve_data_config(
            backbone, image_size, mean, std, interpolation, crop_pct,
            default_image_size=reader.default_image_size, default_crop_pct=reader.default_crop_pct,
        )
        crop = train_crop or reader.train_crop
        flip = reader.hflip if hflip is None else hflip
        self.train_transform = build_transform(self.data_config, train=True, augment=augment, crop=crop,  # type: ignore[arg-type]
                                               hflip=flip)
        self.eval_transform = build_transform(self.data_config, train=False)

        self.hparams.update(  # what was resolved, for results.json and a re-runnable config
            split=self._reader.split, source=self._reader.source, num_classes=self.num_classes,
            task_sizes=self.task_sizes, task_domains=self.task_domains, class_order_resolved=self.class_order,
            data_config=self.data_config.to_dict(), train_crop_resolved=crop, hflip_resolved=flip)
        if self.prefix_cache is not None:
            self.hparams["prefix_cache"] = asdict(self.prefix_cache)

        self._current_task = 0
        self._splits: dict[Split, _LoadedSplit] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._train_loader: tuple[int, DataLoader] | None = None
        self._test_loaders: dict[int, DataLoader] = {}

    # ---- task protocol -------------------------------------------------------------------------------------

    @property
    def current_task(self) -> int:
        """The task the train loader serves; test loaders cover tasks ``0..current_task``."""
        return self._current_task

    @current_task.setter
    def current_task(self, task: int) -> None:
        self.set_task(task)

    def set_task(self, task: int) -> None:
        """Make ``task`` current. Its shuffling generator is created the first time and then kept, so the
        sequence of epochs of a task is the same however often its loader is requested."""
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an integer in 0..{self.num_tasks - 1}, got {task!r}.")
        task = int(task)
        self._generator(task)
        if self._train_loader is not None and self._train_loader[0] != task:
            self._train_loader = None  # drop it, and its persistent workers; the generator survives
        self._current_task = task

    def task_classes(self, task: int) -> list[int]:
        """Global class indices owned by ``task`` (a contiguous range)."""
        self._check_task(task)
        return list(self._ranges[task])

    @property
    def class_names(self) -> list[str] | None:
        """Class names in global order (``class_names[k]`` names global class ``k``); None before a pending
        download."""
        names = self._reader.class_names
        return None if names is None else [names[c] for c in self.class_order]

    def seen_classes(self, task: int | None = None) -> list[int]:
        """Global classes of tasks ``0..task`` (default: the current task)."""
        task = self._current_task if task is None else task
        self._check_task(task)
        return list(range(self._ranges[task].stop))

    # ---- Lightning hooks -----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download where ``download=True`` and a downloader exists; nothing else (it runs on one process)."""
        self._reader.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs (all of a split's tasks at once, decoded once); idempotent.

        All or nothing: if one split fails (a corrupt image, a class without images) none of this call's splits
        is kept, and a decode cache is only written once its split decoded completely.
        """
        splits: tuple[Split, ...] = ("train", "test") if stage in (None, "fit") else ("test",)
        loaded = {split: self._load_split(split) for split in splits if split not in self._splits}
        self._splits.update(loaded)

    def train_dataloader(self) -> DataLoader:
        """The current task's training samples, shuffled by the task's generator (the same loader is returned
        while the task stays current, so reloading every epoch changes nothing)."""
        task = self._current_task
        if self._train_loader is not None and self._train_loader[0] == task:
            return self._train_loader[1]
        dataset = self.task_dataset(task, "train")
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=task_sampler(dataset, self._generator(task), getattr(self, "trainer", None)),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(task_seed(self.seed, task, 1)),
        )
        self._train_loader = (task, loader)
        return loader

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task ``0..current_task``, in task order (``dataloader_idx`` is the task index)."""
        return [self._test_loader(t) for t in range(self._current_task + 1)]

    def val_dataloader(self) -> list[DataLoader]:
        """The test loaders: the test split is the evaluation set of class-incremental benchmarks."""
        return self.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """The current task and each started task's shuffling generator, so a resumed run continues exactly."""
        return {
            "current_task": self._current_task,
            "generator_states": {t: g.get_state() for t, g in self._generators.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for task, state in state_dict.get("generator_states", {}).items():
            self._generator(int(task)).set_state(state)
        self.set_task(int(state_dict["current_task"]))

    # ---- data access ---------------------------------------------------------------------------------------

    def task_dataset(self, task: int, split: Split = "train") -> TaskDataset | CachedTaskDataset:
        """The samples of ``task`` in ``split``, with the train transform for ``"train"``, else the eval one
        (with a prefix cache: their cached activations)."""
        self._check_task(task)
        loaded = self._split(split)
        if loaded.features is not None:
            return CachedTaskDataset(loaded.features, loaded.labels, loaded.task_indices[task])
        transform = self.train_transform if split == "train" else self.eval_transform
        return TaskDataset(loaded.store, loaded.labels, loaded.task_indices[task], transform)

    def _split(self, split: Split) -> _LoadedSplit:
        if split not in self._splits:
            self._splits[split] = self._load_split(split)
        return self._splits[split]

    def _load_split(self, split: Split) -> _LoadedSplit:
        data = self._reader.load(split)
        if self._reader.num_classes != self.num_classes:
            raise ValueError(f"{self.dataset}: the data set has {self._reader.num_classes} classes, not the "
                             f"{self.num_classes} this scenario was built for.")
        if len(data.labels) and (data.labels.min() < 0 or data.labels.max() >= self.num_classes):
            raise ValueError(f"{self.dataset}: the {split} split has labels outside 0..{self.num_classes - 1}.")
        empty = np.flatnonzero(np.bincount(data.labels, minlength=self.num_classes) == 0).tolist()
        if empty:
            names = self._reader.class_names
            shown = [names[c] if names else c for c in empty[:5]]
            raise ValueError(
                f"{self.dataset}: the {split} split ({self._reader.split}) has no image of {len(empty)} class(es), "
                f"e.g. {shown}; every class needs images in both splits (a class with a single image cannot be "
                "split)."
            )
        def store_of() -> ImageStore:
            return data.to_store(self.cache_dir, f"{self.dataset}-{split}", verify=self.verify_images)

        features = None
        if self.prefix_cache is None:
            store = store_of()
        else:  # images are decoded only if the cache has to be built
            store = LazyImageStore(len(data.labels), store_of)
            features = self._prefix_features(split, data, store)
        labels = self._global_of[data.labels]
        indices = [np.flatnonzero((labels >= r.start) & (labels < r.stop)) for r in self._ranges]
        return _LoadedSplit(store, torch.from_numpy(labels), indices, features)

    def _prefix_features(self, split: Split, data: SplitData, store: ImageStore) -> CachedFeatures:
        assert self.prefix_cache is not None
        train = split == "train"
        transform_key = {"data_config": self.data_config.to_dict(), "kind": "train" if train else "eval"}
        if train:
            transform_key.update(augment=self.hparams["augment"], crop=self.hparams["train_crop_resolved"],
                                 hflip=self.hparams["hflip_resolved"])
        return split_features(
            self.prefix_cache, dataset=self.dataset, split=split, split_name=self._reader.split,
            source=self._reader.source, root=self._reader.root, data=data, store=store,
            transform=self.train_transform if train else self.eval_transform, transform_key=transform_key,
            augment=train and bool(self.hparams["augment"]),
        )

    def _test_loader(self, task: int) -> DataLoader:
        if task not in self._test_loaders:
            self._test_loaders[task] = DataLoader(
                self.task_dataset(task, "test"),
                batch_size=self.eval_batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(task_seed(self.seed, task, 2)),
            )
        return self._test_loaders[task]

    def _generator(self, task: int) -> torch.Generator:
        if task not in self._generators:
            self._generators[task] = torch.Generator().manual_seed(task_seed(self.seed, task, 0))
        return self._generators[task]

    def _check_task(self, task: int) -> None:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an integer in 0..{self.num_tasks - 1}, got {task!r}.")


__all__ = ["ClassIncrementalDataModule"]

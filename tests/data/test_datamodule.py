"""`ClassIncrementalDataModule`: the task protocol, class orders applied to labels, reproducible batches,
checkpoint state, transforms, and errors raised before anything is built."""

from __future__ import annotations

import io
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from ham_lightning import TaskProtocol
from ham_lightning.data import ClassIncrementalDataModule
from ham_lightning.lightning.task_protocol import check_task_protocol


def digits(**kwargs) -> ClassIncrementalDataModule:
    args = dict(batch_size=16, limit_per_class_train=12, limit_per_class_test=4)
    args.update(kwargs)
    return ClassIncrementalDataModule("digits", **args)


def epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


# ---- the scenario ------------------------------------------------------------------------------------------------


def test_scenario_is_known_before_setup(tmp_path: Path, layouts) -> None:
    layouts.make_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    dm = ClassIncrementalDataModule("cifar100", root=str(tmp_path), num_tasks=10, image_size=32)
    assert not dm._splits, "no image is read before setup"
    assert dm.num_classes == 100 and dm.num_tasks == 10 and dm.task_sizes == [10] * 10
    np.random.seed(1993)
    assert dm.class_order == np.random.permutation(100).tolist()
    for t in range(10):
        assert dm.task_classes(t) == list(range(10 * t, 10 * t + 10))
    assert dm.seen_classes(3) == list(range(40))
    assert dm.hparams["split"] == "official" and dm.hparams["class_order_resolved"] == dm.class_order
    assert dm.hparams["task_sizes"] == [10] * 10 and dm.hparams["num_classes"] == 100
    assert dm.class_names is not None and dm.class_names[0] == f"class_{dm.class_order[0]:02d}"


def test_labels_are_global_indices_after_the_class_order(tmp_path: Path, layouts) -> None:
    layouts.make_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    dm = ClassIncrementalDataModule("cifar100", root=str(tmp_path), num_tasks=5, image_size=32, augment=False,
                                    batch_size=64)
    dm.setup()
    seen: dict[str, set[int]] = {"train": set(), "test": set()}
    for t in range(5):
        for split, per_class in (("train", 2), ("test", 1)):
            dataset = dm.task_dataset(t, split)
            targets = dataset.targets().tolist()
            assert sorted(set(targets)) == dm.task_classes(t)  # exactly the task's classes
            assert len(targets) == 20 * per_class
            assert seen[split].isdisjoint(targets)
            seen[split] |= set(targets)
            for position in range(len(dataset)):
                index = int(dataset.indices[position])
                original = dm.class_order[targets[position]]
                # the raw pixels belong to the original class that the global label maps back to
                assert int(dataset.store.get(index)[0, 0, 0]) == layouts.tone(original)
    assert seen["train"] == seen["test"] == set(range(100))  # tasks cover every class


def test_increment_initial_classes_and_explicit_orders() -> None:
    dm = digits(increment=2, initial_classes=4)
    assert dm.task_sizes == [4, 2, 2, 2] and dm.num_tasks == 4
    assert dm.task_classes(0) == [0, 1, 2, 3] and dm.task_classes(3) == [8, 9]
    assert digits(num_tasks=2, class_order="natural").class_order == list(range(10))
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    dm = digits(num_tasks=2, class_order=order, augment=False)
    dm.setup()
    # global class 0 is original digit 9
    assert set(torch.cat([y for _, y in dm.train_dataloader()]).tolist()) == {0, 1, 2, 3, 4}
    assert dm._reader.load("train").labels[dm.task_dataset(0).indices].tolist() == [
        order[int(y)] for y in dm.task_dataset(0).targets()]
    assert digits(seed=7).class_order == np.random.RandomState(7).permutation(10).tolist()
    assert digits().num_tasks == 5  # the embedded default's 5 tasks of 2 digits


# ---- the task protocol -------------------------------------------------------------------------------------------


def test_task_protocol() -> None:
    dm = digits(num_tasks=5, epochs_per_task=3)
    assert check_task_protocol(dm) is dm and isinstance(dm, TaskProtocol)
    assert dm.epochs_per_task == 3 and dm.current_task == 0
    dm.setup("fit")
    for t in range(dm.num_tasks):
        dm.set_task(t)
        assert dm.current_task == t
        loader = dm.train_dataloader()
        assert loader is dm.train_dataloader(), "the same loader while the task stays current"
        labels = torch.cat([y for _, y in loader])
        assert len(labels) == 24 and set(labels.tolist()) == set(dm.task_classes(t))
        tests = dm.test_dataloader()
        assert len(tests) == t + 1
        for j, test_loader in enumerate(tests):
            test_labels = torch.cat([y for _, y in test_loader])
            assert set(test_labels.tolist()) == set(dm.task_classes(j)) and len(test_labels) == 8
        assert dm.val_dataloader() == tests
    dm.current_task = 1  # the setter is set_task
    assert dm.current_task == 1 and len(dm.test_dataloader()) == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    for bad in (-1, 5, 1.0, True):
        with pytest.raises(ValueError, match=r"task must be an integer in 0\.\.4"):
            dm.set_task(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"task must be an integer in 0\.\.4"):
        dm.task_classes(5)


def test_setup_test_stage_and_lazy_loading() -> None:
    dm = digits(num_tasks=2)
    dm.setup("test")
    assert set(dm._splits) == {"test"}
    assert len(dm.test_dataloader()) == 1
    dm.train_dataloader()  # loads the train split on demand
    assert set(dm._splits) == {"train", "test"}


# ---- reproducibility ---------------------------------------------------------------------------------------------


def test_same_scenario_twice_gives_identical_tasks_and_batches() -> None:
    a, b = digits(num_tasks=5), digits(num_tasks=5)
    a.setup()
    b.setup()
    for t in (0, 3):
        a.set_task(t)
        b.set_task(t)
        assert a.task_classes(t) == b.task_classes(t)
        assert (a.task_dataset(t).indices == b.task_dataset(t).indices).all()
        first_a, first_b = epoch(a.train_dataloader()), epoch(b.train_dataloader())
        assert same_batches(first_a, first_b)
        second_a = epoch(a.train_dataloader())
        assert same_batches(second_a, epoch(b.train_dataloader()))
        assert not same_batches(first_a, second_a), "each epoch reshuffles and re-augments"
        assert same_batches(epoch(a.test_dataloader()[t]), epoch(b.test_dataloader()[t]))
    other = digits(num_tasks=5, seed=1)
    other.setup()
    assert other.class_order != a.class_order
    # a task's epochs do not depend on what other tasks were trained before: each task has its own generator
    detour = digits(num_tasks=5)
    detour.set_task(3)
    epoch(detour.train_dataloader())
    detour.set_task(0)
    assert same_batches(epoch(detour.train_dataloader()), epoch(digits(num_tasks=5).train_dataloader()))


def test_batches_do_not_depend_on_workers_or_global_rng() -> None:
    in_process = digits(num_tasks=5, limit_per_class_train=8)
    with_worker = digits(num_tasks=5, limit_per_class_train=8, num_workers=1)
    torch.manual_seed(0)
    expected = epoch(in_process.train_dataloader())
    torch.manual_seed(123)
    assert same_batches(epoch(with_worker.train_dataloader()), expected)


def test_augmentation_switch() -> None:
    plain = digits(num_tasks=5, augment=False)
    x = plain.task_dataset(0)[0][0]
    store, index = plain.task_dataset(0).store, int(plain.task_dataset(0).indices[0])
    assert torch.equal(x, plain.eval_transform(store.get(index)))
    augmented = digits(num_tasks=5)
    views = {augmented.train_transform(store.get(index)).sum().item() for _ in range(8)}
    assert len(views) > 1, "train-time augmentation changes the image"


def test_state_dict_restores_task_and_shuffling() -> None:
    first = digits(num_tasks=5)
    first.set_task(2)
    epoch(first.train_dataloader())
    state = first.state_dict()
    assert state["current_task"] == 2
    second_epoch = epoch(first.train_dataloader())
    resumed = digits(num_tasks=5)
    resumed.load_state_dict(state)
    assert resumed.current_task == 2
    assert same_batches(epoch(resumed.train_dataloader()), second_epoch)
    restarted = digits(num_tasks=5)
    restarted.set_task(2)  # without the state: the task's first epoch again
    assert not same_batches(epoch(restarted.train_dataloader()), second_epoch)
    # it survives a checkpoint round trip (torch.save / torch.load with weights_only)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    from_checkpoint = digits(num_tasks=5)
    from_checkpoint.load_state_dict(torch.load(buffer, weights_only=True))
    assert from_checkpoint.current_task == 2
    assert same_batches(epoch(from_checkpoint.train_dataloader()), second_epoch)


# ---- transforms --------------------------------------------------------------------------------------------------


def test_transforms_follow_the_backbone_and_overrides() -> None:
    dm = digits(num_tasks=5, backbone="tf_efficientnet_lite0", image_size=24)
    config = dm.data_config
    assert config.image_size == 24 and config.mean == (0.5, 0.5, 0.5) and config.std == (0.5, 0.5, 0.5)
    assert config.interpolation == "bicubic" and config.crop_pct == 0.875
    assert dm.hparams["data_config"]["mean"] == (0.5, 0.5, 0.5)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 24, 24) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    vit = digits(num_tasks=5, backbone="vit_base_patch16_224.augreg_in21k", mean=(0.1, 0.2, 0.3))
    assert vit.data_config.image_size == 224 and vit.data_config.crop_pct == 0.9
    assert vit.data_config.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="not a timm model name"):
        digits(backbone="no_such_model_xyz")


# ---- errors ------------------------------------------------------------------------------------------------------


def test_bad_arguments_fail_in_the_constructor() -> None:
    with pytest.raises(ValueError, match=r"num_tasks=11 is more than the 10 classes"):
        digits(num_tasks=11)
    with pytest.raises(ValueError, match=r"class_order is not a permutation of 0\.\.9.*missing \[9\].*"
                                         r"duplicated \[0\]"):
        digits(num_tasks=2, class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        ClassIncrementalDataModule("mnist")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        digits(batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        digits(num_workers=-1)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        digits(test_fraction=1.0)
    with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.2\*\*32-1"):
        digits(seed=-1)
    with pytest.raises(ValueError, match="train_crop must be 'resized' or 'pad'"):
        digits(train_crop="center")  # type: ignore[arg-type]


# ---- with Lightning ----------------------------------------------------------------------------------------------


class _Linear(pl.LightningModule):
    """A linear classifier over flattened images: enough to drive Lightning's loops."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, num_classes))
        self.test_labels: dict[int, set[int]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.test_labels.setdefault(dataloader_idx, set()).update(batch[1].tolist())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_two_tasks_through_lightning() -> None:
    dm = digits(num_tasks=2, image_size=16, limit_per_class_train=4, limit_per_class_test=2)
    model = _Linear(dm.num_classes)
    kwargs = dict(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    for task in range(dm.num_tasks):
        dm.set_task(task)
        trainer = pl.Trainer(**kwargs)
        trainer.fit(model, datamodule=dm)
        assert trainer.global_step == 2  # 5 classes x 4 images = 20 samples in batches of 16
        model.test_labels.clear()
        trainer.test(model, datamodule=dm, verbose=False)
        assert sorted(model.test_labels) == list(range(task + 1))
        for j, labels in model.test_labels.items():
            assert labels == set(dm.task_classes(j))

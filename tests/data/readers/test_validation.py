"""`ValidationReader`: held-out training images replace the test split, which is never read."""

from __future__ import annotations

import numpy as np
import pytest

from ham_lightning.data import ClassIncrementalDataModule
from ham_lightning.data.readers import ReadOptions, build_reader
from ham_lightning.data.readers.validation import ValidationReader


def test_held_out_part_of_train_replaces_test_and_test_is_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    inner = build_reader("digits", None, ReadOptions(limit_per_class_train=12))
    full = inner.load("train")
    reader = ValidationReader(inner, 0.25, seed=3)

    def refuse(split):
        if split == "test":
            raise AssertionError("the test split was read")
        return original(split)

    original = inner.load
    monkeypatch.setattr(inner, "load", refuse)
    train, test = reader.load("train"), reader.load("test")
    assert set(train.names).isdisjoint(test.names)
    assert sorted(train.names + test.names) == sorted(full.names)
    assert np.bincount(test.labels).tolist() == [3] * 10  # 25% of each class's 12
    positions = [full.names.index(n) for n in test.names]
    assert np.array_equal(test.images if test.images is not None else test.decode(),
                          (full.images if full.images is not None else full.decode())[positions])
    assert reader.split != inner.split and reader.num_classes == inner.num_classes
    assert ValidationReader(inner, 0.25, seed=4).load("test").names != test.names


def test_the_wrapped_train_split_is_read_and_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    inner = build_reader("digits", None)
    calls = {"load": 0, "decode": 0}
    original = inner.load

    def counted(split):
        calls["load"] += 1
        data = original(split)
        images = data.images if data.images is not None else data.decode()

        def decode():
            calls["decode"] += 1
            return images

        data.images, data.decode = None, decode
        return data

    monkeypatch.setattr(inner, "load", counted)
    reader = ValidationReader(inner, 0.2, seed=0)
    train, test = reader.load("train"), reader.load("test")
    assert train.decode().shape[0] + test.decode().shape[0] == len(train.labels) + len(test.labels)
    assert calls == {"load": 1, "decode": 1}


def test_datamodule_evaluates_on_the_held_out_images() -> None:
    dm = ClassIncrementalDataModule("digits", num_tasks=5, limit_per_class_train=12, validation_fraction=0.25)
    dm.setup("fit")
    assert len(dm.task_dataset(0, "train")) == 2 * 9 and len(dm.task_dataset(0, "test")) == 2 * 3
    assert dm.hparams["split"].startswith("validation_25")


def test_bad_fraction_says_what_it_means() -> None:
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\)"):
        ClassIncrementalDataModule("digits", validation_fraction=1.5)

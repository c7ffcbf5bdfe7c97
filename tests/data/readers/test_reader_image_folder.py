"""The generic ``image_folder`` reader (``root/<class>/*``) and per-file image errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ham_lightning.data import ClassIncrementalDataModule, ReadOptions, build_reader
from ham_lightning.data.image_store import FileImageStore

CLASSES = ["cat", "dog", "emu", "fox"]


def test_seeded_split_labels_follow_sorted_folder_names(tmp_path: Path, layouts, class_of_image) -> None:
    layouts.make_class_folders(tmp_path, ["fox", "cat", "emu", "dog"], [3, 4, 5, 6], suffix=".png")
    reader = build_reader("image_folder", tmp_path, ReadOptions(test_fraction=0.25, split_seed=3))
    assert reader.class_names == CLASSES  # ImageFolder's numbering: sorted folder names
    assert reader.split == "seeded_75_25"
    train, test = reader.load("train"), reader.load("test")
    # cat 4, dog 6, emu 5, fox 3 images: round(n / 4) of each go to test, at least one on each side
    assert np.bincount(test.labels).tolist() == [1, 2, 1, 1]
    assert np.bincount(train.labels).tolist() == [3, 4, 4, 2]
    store = FileImageStore(train.names + test.names)
    labels = np.concatenate([train.labels, test.labels])
    # write order was fox(0), cat(1), emu(2), dog(3): the pixels carry the write index, labels the sorted one
    written = {"fox": 0, "cat": 1, "emu": 2, "dog": 3}
    for i in range(len(store)):
        image = store.get(i)
        assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
        assert class_of_image(image) == written[CLASSES[labels[i]]]
        assert Path(store.paths[i]).parent.name == CLASSES[labels[i]]


def test_presplit_and_mismatched_class_folders(tmp_path: Path, layouts) -> None:
    layouts.make_class_folders(tmp_path / "train", CLASSES, 3)
    layouts.make_class_folders(tmp_path / "test", CLASSES, 1)
    reader = build_reader("image_folder", tmp_path, ReadOptions(limit_per_class_train=2))
    assert reader.split == "folders" and reader.num_classes == 4
    assert np.bincount(reader.load("train").labels).tolist() == [2, 2, 2, 2]
    assert np.bincount(reader.load("test").labels).tolist() == [1, 1, 1, 1]
    layouts.make_class_folders(tmp_path / "test", ["gnu"], 1)
    with pytest.raises(ValueError, match=r"must hold the same class folders; only in train/: \[\], "
                                         r"only in test/: \['gnu'\]"):
        build_reader("image_folder", tmp_path)


def test_missing_root_no_classes_and_empty_class(tmp_path: Path, layouts) -> None:
    with pytest.raises(FileNotFoundError, match=r"image_folder: root .*nope does not exist\. Expected layout: "
                                                r"ROOT/<class>/<image>"):
        ClassIncrementalDataModule("image_folder", root=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"needs root, the folder that holds it\. Expected layout"):
        ClassIncrementalDataModule("image_folder")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"a_file is not a folder"):
        build_reader("image_folder", tmp_path / "a_file")
    layouts.make_class_folders(tmp_path / "data", CLASSES, 2)
    (tmp_path / "data" / "gnu").mkdir()
    with pytest.raises(ValueError, match=r"image_folder: class folder .*gnu has no images"):
        ClassIncrementalDataModule("image_folder", root=str(tmp_path / "data"), num_tasks=5)


def test_single_image_class_cannot_be_split(tmp_path: Path, layouts) -> None:
    layouts.make_class_folders(tmp_path, CLASSES, [3, 3, 1, 3])
    dm = ClassIncrementalDataModule("image_folder", root=str(tmp_path), num_tasks=2, image_size=8)
    with pytest.raises(ValueError, match=r"the test split \(seeded_80_20\) has no image of 1 class\(es\), "
                                         r"e\.g\. \['emu'\]"):
        dm.setup()
    assert not dm._splits


def test_corrupt_image_is_named_at_setup_and_nothing_is_kept(tmp_path: Path, layouts) -> None:
    layouts.make_class_folders(tmp_path, CLASSES, 3)
    bad = tmp_path / "dog" / "img_1.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a JPEG")
    dm = ClassIncrementalDataModule("image_folder", root=str(tmp_path), num_tasks=2, image_size=8)
    with pytest.raises(ValueError, match=r"Corrupt or unreadable image: .*dog/img_1\.jpg"):
        dm.setup()
    assert not dm._splits
    # verify_images=False defers the check to the loader, which names the file too.
    dm = ClassIncrementalDataModule("image_folder", root=str(tmp_path), num_tasks=2, image_size=8,
                                    class_order="natural", verify_images=False, split_seed=1)
    dm.setup()
    errors = []
    for split in ("train", "test"):
        for task in range(2):
            dataset = dm.task_dataset(task, split)
            for i in range(len(dataset)):
                try:
                    dataset[i]
                except ValueError as err:
                    errors.append(str(err))
    assert len(errors) == 1 and "Corrupt or unreadable image" in errors[0] and str(bad) in errors[0]


def test_truncated_png_fails_verification_and_truncated_jpeg_fails_decoding(tmp_path: Path, layouts) -> None:
    layouts.make_class_folders(tmp_path, CLASSES, 3, suffix=".png", size=(16, 16))
    png = tmp_path / "emu" / "img_2.png"
    png.write_bytes(png.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"Corrupt or unreadable image: .*emu/img_2\.png"):
        ClassIncrementalDataModule("image_folder", root=str(tmp_path), num_tasks=2, image_size=8).setup()
    jpeg = layouts.write_image(tmp_path / "x" / "a.jpg", 0, 0, size=(32, 32))
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    store = FileImageStore([str(jpeg)])
    with pytest.raises(ValueError, match=r"Corrupt or unreadable image: .*x/a\.jpg"):
        store.get(0)


def test_hidden_entries_are_skipped_and_files_come_in_natural_order(tmp_path: Path, layouts) -> None:
    layouts.make_class_folders(tmp_path, CLASSES, 11)  # img_0 .. img_10
    layouts.make_class_folders(tmp_path / ".thumbnails", ["x"], 1)  # a hidden folder is no class
    (tmp_path / "cat" / ".img_99.jpg").write_bytes((tmp_path / "cat" / "img_0.jpg").read_bytes())
    layouts.make_class_folders(tmp_path / "dog" / ".cache", ["y"], 1)  # nor are images in hidden sub-folders
    (tmp_path / "emu" / "notes.txt").write_text("not an image")
    layouts.make_class_folders(tmp_path / "fox" / "more", ["z"], 1)  # visible sub-folders are read
    reader = build_reader("image_folder", tmp_path, ReadOptions(test_fraction=0.5, split_seed=0))
    assert reader.class_names == CLASSES
    names = reader.load("train").names + reader.load("test").names
    assert len(names) == 4 * 11 + 1 and not any("/." in n for n in names)
    paths, labels = reader._index()["train"]
    cat_train = [Path(p).name for p, label in zip(paths, labels) if label == 0]
    assert cat_train == sorted(cat_train, key=lambda n: int(n[4:-4]))  # img_2 before img_10
    assert sum(Path(n).parent.name == "cat" for n in names) == 11

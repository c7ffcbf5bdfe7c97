"""CUB-200-2011 from its official text files, or from pre-split ``train/`` ``test/`` folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ham_lightning.data import ClassIncrementalDataModule, build_reader
from ham_lightning.data.image_store import FileImageStore


def test_official_files(tmp_path: Path, layouts, class_of_image) -> None:
    folder = layouts.make_cub(tmp_path, per_class=4)
    reader = build_reader("cub200", tmp_path)
    assert reader.split == "official" and reader.num_classes == 4
    assert reader.class_names == layouts.CUB_CLASSES
    train, test = reader.load("train"), reader.load("test")
    assert np.bincount(train.labels).tolist() == [2, 2, 2, 2]
    assert np.bincount(test.labels).tolist() == [2, 2, 2, 2]
    assert set(train.names).isdisjoint(test.names)
    assert all(Path(n).is_file() and str(folder / "images") in n for n in train.names + test.names)
    # class k is label k + 1 of image_class_labels.txt, and the pixels agree
    store = FileImageStore(train.names)
    for i, label in enumerate(train.labels):
        assert class_of_image(store.get(i)) == label
        assert Path(train.names[i]).parent.name == layouts.CUB_CLASSES[label]
    # ROOT may be CUB_200_2011 itself; without classes.txt the image folders name the classes
    (folder / "classes.txt").unlink()
    again = build_reader("cub200", folder)
    assert again.class_names == layouts.CUB_CLASSES and again.load("test").names == test.names


def test_presplit_folders(tmp_path: Path, layouts) -> None:
    layouts.make_class_folders(tmp_path / "train", layouts.CUB_CLASSES, 3)
    layouts.make_class_folders(tmp_path / "test", layouts.CUB_CLASSES, 2)
    dm = ClassIncrementalDataModule("cub200", root=str(tmp_path), num_tasks=2, image_size=8,
                                    limit_per_class_train=2)
    assert dm.hparams["split"] == "folders" and dm.num_classes == 4
    dm.setup()
    assert [len(dm.task_dataset(t, "train")) for t in range(2)] == [4, 4]
    assert [len(dm.task_dataset(t, "test")) for t in range(2)] == [4, 4]


def test_missing_and_malformed_official_files(tmp_path: Path, layouts) -> None:
    with pytest.raises(FileNotFoundError, match=r"cub200: root .*absent does not exist\. Expected layout: "
                                                r"ROOT/CUB_200_2011/\{images/<class>/<image>, images\.txt"):
        build_reader("cub200", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"found neither CUB_200_2011/images\.txt nor train/ and test/"):
        build_reader("cub200", tmp_path / "empty")

    folder = layouts.make_cub(tmp_path / "a", per_class=2)
    (folder / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_test_split\.txt is missing\. Expected layout"):
        build_reader("cub200", folder)

    folder = layouts.make_cub(tmp_path / "b", per_class=2)
    lines = (folder / "image_class_labels.txt").read_text().splitlines()
    (folder / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt has no entry for 1 image id\(s\)"):
        build_reader("cub200", folder)

    folder = layouts.make_cub(tmp_path / "c", per_class=2)
    (folder / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in range(1, 9)))
    with pytest.raises(ValueError, match=r"official test split has no image of class\(es\)"):
        build_reader("cub200", folder)

    folder = layouts.make_cub(tmp_path / "d", per_class=2)
    next((folder / "images").rglob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in images\.txt are missing"):
        build_reader("cub200", folder)

    folder = layouts.make_cub(tmp_path / "e", per_class=2)
    (folder / "images.txt").write_text("one 001.X/a.jpg\n")
    with pytest.raises(ValueError, match=r"line 1 of .*images\.txt is not '<image id> <value>'"):
        build_reader("cub200", folder)


def test_corrupt_cub_image_is_named(tmp_path: Path, layouts) -> None:
    folder = layouts.make_cub(tmp_path, per_class=2)
    bad = sorted((folder / "images" / layouts.CUB_CLASSES[2]).glob("*.jpg"))[0]
    bad.write_bytes(b"GIF89a broken")
    dm = ClassIncrementalDataModule("cub200", root=str(tmp_path), num_tasks=2, image_size=8)
    with pytest.raises(ValueError, match=rf"Corrupt or unreadable image: .*{bad.name}"):
        dm.setup()
    assert not dm._splits

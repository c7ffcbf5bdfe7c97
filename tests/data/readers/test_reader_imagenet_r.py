"""ImageNet-R from ``imagenet-r/<wnid>/*.jpg``: split file, pre-split folders, or the seeded per-class 80/20."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ham_lightning.data import ClassIncrementalDataModule, ReadOptions, build_reader

WNIDS = ["n01443537", "n01484850", "n01494475", "n01496331"]


def make_imagenet_r(root: Path, layouts, per_class: int | list[int] = 5) -> Path:
    base = root / "imagenet-r"
    layouts.make_class_folders(base, WNIDS, per_class)
    (base / "README.txt").write_text("not an image")  # stray files are ignored
    (base / WNIDS[0] / ".DS_Store").write_bytes(b"\0\0")
    return base


def test_seeded_80_20_split_is_per_class_deterministic_and_recorded(tmp_path: Path, layouts) -> None:
    base = make_imagenet_r(tmp_path, layouts, per_class=[5, 10, 6, 5])
    reader = build_reader("imagenet_r", tmp_path)
    assert reader.num_classes == 4 and reader.class_names == sorted(WNIDS)
    assert reader.split == "seeded_80_20" and reader.source == str(base)
    train, test = reader.load("train"), reader.load("test")
    assert np.bincount(train.labels).tolist() == [4, 8, 5, 4]
    assert np.bincount(test.labels).tolist() == [1, 2, 1, 1]
    assert train.images is None and train.decode is None  # decoded per item from the files
    assert set(train.names).isdisjoint(test.names)
    everything = sorted(str(p) for p in base.rglob("*.jpg"))
    assert sorted(train.names + test.names) == everything
    for name, label in zip(train.names + test.names, np.concatenate([train.labels, test.labels])):
        assert Path(name).parent.name == WNIDS[label]
    # Same split_seed, same split; another seed, another split.
    again = build_reader("imagenet_r", base)  # ROOT may be the imagenet-r folder itself
    assert again.load("test").names == test.names
    other = build_reader("imagenet_r", tmp_path, ReadOptions(split_seed=1))
    assert other.load("test").names != test.names
    half = build_reader("imagenet_r", tmp_path, ReadOptions(test_fraction=0.5))
    assert half.split == "seeded_50_50" and np.bincount(half.load("test").labels).tolist() == [2, 5, 3, 2]


def test_text_split_file(tmp_path: Path, layouts) -> None:
    make_imagenet_r(tmp_path, layouts, per_class=3)
    split_file = tmp_path / "imr_train.txt"
    # One training image per line with a label (ignored: the class is the folder), prefixed with imagenet-r/.
    split_file.write_text("".join(f"imagenet-r/{w}/img_{k}.jpg {i}\n" for i, w in enumerate(WNIDS) for k in (0, 2)))
    reader = build_reader("imagenet_r", tmp_path, ReadOptions(split_file=str(split_file)))
    assert reader.split == "split_file"
    train, test = reader.load("train"), reader.load("test")
    assert [Path(n).name for n in train.names] == ["img_0.jpg", "img_2.jpg"] * 4
    assert [Path(n).name for n in test.names] == ["img_1.jpg"] * 4
    assert test.labels.tolist() == [0, 1, 2, 3]


def test_json_split_file_and_its_errors(tmp_path: Path, layouts) -> None:
    make_imagenet_r(tmp_path, layouts, per_class=3)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": [f"{w}/img_0.jpg" for w in WNIDS] + [f"{w}/img_1.jpg" for w in WNIDS],
                                      "test": [f"{w}/img_2.jpg" for w in WNIDS]}))
    dm = ClassIncrementalDataModule("imagenet_r", root=str(tmp_path), split_file=str(split_file), num_tasks=2,
                                    image_size=8, class_order="natural")
    assert dm.hparams["split"] == "split_file"
    dm.setup("fit")
    assert len(dm.task_dataset(0, "train")) == 4 and len(dm.task_dataset(1, "test")) == 2

    split_file.write_text(json.dumps({"train": [f"{WNIDS[0]}/img_9.jpg"], "test": []}))
    with pytest.raises(FileNotFoundError, match=r"lists 1 image\(s\) not found under .*img_9\.jpg"):
        build_reader("imagenet_r", tmp_path, ReadOptions(split_file=str(split_file))).load("train")
    split_file.write_text(json.dumps({"train": [f"{WNIDS[0]}/img_0.jpg"], "test": [f"{WNIDS[0]}/img_0.jpg"]}))
    with pytest.raises(ValueError, match=r"puts 1 image\(s\) in both train and test"):
        build_reader("imagenet_r", tmp_path, ReadOptions(split_file=str(split_file))).load("train")
    split_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r'must be a JSON object \{"train"'):
        build_reader("imagenet_r", tmp_path, ReadOptions(split_file=str(split_file))).load("train")
    with pytest.raises(FileNotFoundError, match="split_file .*absent.txt does not exist"):
        build_reader("imagenet_r", tmp_path, ReadOptions(split_file=str(tmp_path / "absent.txt"))).load("train")


def test_presplit_train_test_folders(tmp_path: Path, layouts) -> None:
    base = tmp_path / "imagenet-r"
    layouts.make_class_folders(base / "train", WNIDS, 4)
    layouts.make_class_folders(base / "test", WNIDS, 2)
    with pytest.warns(UserWarning, match="single class"):  # 4 classes in 4 tasks: said, not refused
        dm = ClassIncrementalDataModule("imagenet_r", root=str(tmp_path), num_tasks=4, image_size=8)
    assert dm.hparams["split"] == "folders" and dm.num_classes == 4
    dm.setup()
    assert sum(len(dm.task_dataset(t, "train")) for t in range(4)) == 16
    assert sum(len(dm.task_dataset(t, "test")) for t in range(4)) == 8


def test_missing_root_and_empty_class_folder(tmp_path: Path, layouts) -> None:
    with pytest.raises(FileNotFoundError, match=r"imagenet_r: root .*absent does not exist\. Expected layout: "
                                                r"ROOT/imagenet-r/<wnid>/<image>"):
        build_reader("imagenet_r", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no class folders under .*Expected layout"):
        build_reader("imagenet_r", tmp_path / "empty")
    make_imagenet_r(tmp_path, layouts, per_class=2)
    (tmp_path / "imagenet-r" / "n09999999").mkdir()
    (tmp_path / "imagenet-r" / "n09999999" / "notes.txt").write_text("no images here")
    # Found when the scenario is built, before any training starts.
    with pytest.raises(ValueError, match=r"class folder .*n09999999 has no images \(looked for \.jpg"):
        ClassIncrementalDataModule("imagenet_r", root=str(tmp_path), num_tasks=5, image_size=8)

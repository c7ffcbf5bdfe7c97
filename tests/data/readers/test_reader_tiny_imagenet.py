"""Tiny-ImageNet from its official layout, as a folder and straight from ``tiny-imagenet-200.zip``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ham_lightning.data import ClassIncrementalDataModule, ReadOptions, build_reader

WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900"]


def check_tiny(reader, layouts, class_of_image) -> None:
    assert reader.num_classes == 4 and reader.class_names == sorted(WNIDS) and reader.split == "official"
    train, test = reader.load("train"), reader.load("test")
    assert train.decode is not None and test.decode is not None  # decoded once, into memory
    assert np.bincount(train.labels).tolist() == [3, 3, 3, 3]
    assert np.bincount(test.labels).tolist() == [2, 2, 2, 2]
    images = train.decode()
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8
    for i, label in enumerate(train.labels):
        image = images[i]
        if label == 1 and train.names[i].endswith(f"{WNIDS[1]}_0.JPEG"):
            # the grey-scale file became RGB with equal channels
            assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
            continue
        assert class_of_image(np.moveaxis(image, -1, 0)) == label
    val = test.decode()
    # val images interleave the classes (val_0: class 0, val_1: class 1, ...) and come back in natural order
    assert [n.rsplit("/", 1)[1] for n in test.names] == [f"val_{k}.JPEG" for k in range(8)]
    assert test.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [class_of_image(np.moveaxis(v, -1, 0)) for v in val] == test.labels.tolist()


def test_folder_layout(tmp_path: Path, layouts, class_of_image) -> None:
    top = layouts.write_tiny_folder(tmp_path, layouts.tiny_members(WNIDS))
    check_tiny(build_reader("tiny_imagenet", tmp_path), layouts, class_of_image)  # the parent folder
    assert build_reader("tiny_imagenet", top).source == str(top)  # or the folder itself


def test_zip_read_without_extracting(tmp_path: Path, layouts, class_of_image) -> None:
    archive = layouts.write_tiny_zip(tmp_path / "tiny-imagenet-200.zip", layouts.tiny_members(WNIDS))
    reader = build_reader("tiny_imagenet", archive)
    assert reader.source == f"{archive}:tiny-imagenet-200/"
    check_tiny(reader, layouts, class_of_image)
    check_tiny(build_reader("tiny_imagenet", tmp_path), layouts, class_of_image)  # a folder holding the zip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-imagenet-200.zip"]  # nothing extracted


def test_zip_and_folder_give_the_same_datamodule(tmp_path: Path, layouts) -> None:
    files = layouts.tiny_members(WNIDS)
    archive = layouts.write_tiny_zip(tmp_path / "z" / "tiny-imagenet-200.zip", files)
    layouts.write_tiny_folder(tmp_path / "f", files)
    kwargs = dict(num_tasks=2, image_size=32, batch_size=4)
    from_zip = ClassIncrementalDataModule("tiny_imagenet", root=str(archive), **kwargs)
    from_folder = ClassIncrementalDataModule("tiny_imagenet", root=str(tmp_path / "f"), **kwargs)
    from_zip.setup()
    from_folder.setup()
    for task in range(2):
        from_zip.set_task(task)
        from_folder.set_task(task)
        for (xa, ya), (xb, yb) in zip(from_zip.train_dataloader(), from_folder.train_dataloader(), strict=True):
            assert torch_equal(xa, xb) and torch_equal(ya, yb)
        assert len(from_zip.test_dataloader()) == task + 1


def torch_equal(a, b) -> bool:
    return bool((a == b).all()) and a.shape == b.shape


def test_cache_is_written_once_and_reused(tmp_path: Path, layouts) -> None:
    archive = layouts.write_tiny_zip(tmp_path / "tiny-imagenet-200.zip", layouts.tiny_members(WNIDS))
    cache = tmp_path / "cache"
    dm = ClassIncrementalDataModule("tiny_imagenet", root=str(archive), num_tasks=2, image_size=64,
                                    cache_dir=str(cache))
    dm.setup()
    files = sorted(p.name for p in cache.iterdir() if p.suffix != ".lock")  # each entry's lock stays beside it
    assert len(files) == 2 and all(f.startswith(("tiny_imagenet-train-", "tiny_imagenet-test-")) for f in files)
    cached = np.load(next(cache.glob("tiny_imagenet-train-*.npy")))
    assert cached.shape == (12, 64, 64, 3)
    # A second build reads the cache instead of decoding: prove it by making decoding impossible.
    again = ClassIncrementalDataModule("tiny_imagenet", root=str(archive), num_tasks=2, image_size=64,
                                       cache_dir=str(cache))
    import ham_lightning.data.readers.tiny_imagenet as tiny

    original = tiny.decode_many
    tiny.decode_many = lambda *a, **k: pytest.fail("decoded although a cache exists")
    try:
        again.setup()
    finally:
        tiny.decode_many = original
    assert (again.task_dataset(0).store.images.numpy() == dm.task_dataset(0).store.images.numpy()).all()
    # A different selection of images is another cache entry, not a stale hit.
    limited = ClassIncrementalDataModule("tiny_imagenet", root=str(archive), num_tasks=2, image_size=64,
                                         cache_dir=str(cache), limit_per_class_train=1)
    limited.setup("fit")
    assert len(list(cache.glob("tiny_imagenet-train-*.npy"))) == 2
    assert sum(len(limited.task_dataset(t)) for t in range(2)) == 4


def test_missing_root_and_bad_archives(tmp_path: Path, layouts) -> None:
    with pytest.raises(FileNotFoundError, match=r"tiny_imagenet: root .*absent\.zip does not exist\. Expected "
                                                r"layout: tiny-imagenet-200/\{wnids\.txt, train/<wnid>/images/"):
        ClassIncrementalDataModule("tiny_imagenet", root=str(tmp_path / "absent.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"found neither tiny-imagenet-200/wnids\.txt nor "
                                                r"tiny-imagenet-200\.zip under"):
        build_reader("tiny_imagenet", tmp_path / "empty")
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(FileNotFoundError, match=r"fake\.zip is a file but not a zip archive"):
        build_reader("tiny_imagenet", tmp_path / "fake.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("something/else.txt", "x")
    with pytest.raises(FileNotFoundError, match=r"the archive .*other\.zip has no wnids\.txt"):
        build_reader("tiny_imagenet", tmp_path / "other.zip")


def test_class_without_training_images(tmp_path: Path, layouts) -> None:
    files = {k: v for k, v in layouts.tiny_members(WNIDS).items() if not k.startswith(f"train/{WNIDS[2]}/images/")}
    layouts.write_tiny_folder(tmp_path / "f", files)
    (tmp_path / "f" / "tiny-imagenet-200" / "train" / WNIDS[2] / "images").mkdir()
    with pytest.raises(ValueError, match=rf"no training images for 1 class\(es\), e\.g\. .*train/{WNIDS[2]}/images"):
        ClassIncrementalDataModule("tiny_imagenet", root=str(tmp_path / "f"), num_tasks=2)
    archive = layouts.write_tiny_zip(tmp_path / "z.zip", files)
    with pytest.raises(ValueError, match=rf"no training images for 1 class\(es\), e\.g\. .*z\.zip:"
                                         rf"tiny-imagenet-200/train/{WNIDS[2]}/images/"):
        build_reader("tiny_imagenet", archive)


def test_val_annotation_errors(tmp_path: Path, layouts) -> None:
    files = layouts.tiny_members(WNIDS)
    del files["val/images/val_5.JPEG"]
    with pytest.raises(FileNotFoundError, match=r"val/images/val_5\.JPEG, listed in val_annotations\.txt, "
                                                r"is missing"):
        build_reader("tiny_imagenet", layouts.write_tiny_zip(tmp_path / "a.zip", files))
    files = layouts.tiny_members(WNIDS)
    files["val/val_annotations.txt"] += b"val_0.JPEG\tn99999999\t0\t0\t1\t1\n"
    with pytest.raises(ValueError, match=r"line 9 of .*val_annotations\.txt is not '<file>\\t<wnid>\.\.\.' "
                                         r"with a wnid from wnids\.txt"):
        build_reader("tiny_imagenet", layouts.write_tiny_zip(tmp_path / "b.zip", files))
    files = layouts.tiny_members(WNIDS)
    del files["val/val_annotations.txt"]
    with pytest.raises(FileNotFoundError, match=r"val/val_annotations\.txt is missing"):
        build_reader("tiny_imagenet", layouts.write_tiny_zip(tmp_path / "c.zip", files))
    files = layouts.tiny_members(WNIDS)
    lines = files["val/val_annotations.txt"].decode().splitlines(keepends=True)
    files["val/val_annotations.txt"] = "".join(line for line in lines if WNIDS[3] not in line).encode()
    with pytest.raises(ValueError, match=rf"lists no image of 1 class\(es\), e\.g\. \['{WNIDS[3]}'\]"):
        build_reader("tiny_imagenet", layouts.write_tiny_zip(tmp_path / "d.zip", files))


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_corrupt_jpeg_is_named_and_no_cache_is_left(tmp_path: Path, layouts, as_zip: bool) -> None:
    files = layouts.tiny_members(WNIDS)
    rel = f"train/{WNIDS[3]}/images/{WNIDS[3]}_2.JPEG"
    files[rel] = files[rel][:300]  # truncated after a valid header
    root = (layouts.write_tiny_zip(tmp_path / "t.zip", files) if as_zip
            else layouts.write_tiny_folder(tmp_path / "f", files))
    cache = tmp_path / "cache"
    dm = ClassIncrementalDataModule("tiny_imagenet", root=str(root), num_tasks=2, image_size=64,
                                    cache_dir=str(cache))
    with pytest.raises(ValueError, match=rf"Corrupt or unreadable image: .*{rel}"):
        dm.setup()
    assert not dm._splits
    left = [p.name for p in cache.iterdir() if p.suffix != ".lock"] if cache.exists() else []
    assert not left, "a failed decode must not leave a cache file"


def test_limits_keep_the_first_images_of_each_class(tmp_path: Path, layouts) -> None:
    archive = layouts.write_tiny_zip(tmp_path / "t.zip", layouts.tiny_members(WNIDS, train_per_class=12))
    reader = build_reader("tiny_imagenet", archive, ReadOptions(limit_per_class_train=2, limit_per_class_test=1))
    train = reader.load("train")
    # natural order: _0, _1 (not _0, _10)
    assert [n.rsplit("/", 1)[1] for n in train.names[:2]] == [f"{sorted(WNIDS)[0]}_0.JPEG",
                                                               f"{sorted(WNIDS)[0]}_1.JPEG"]
    assert np.bincount(train.labels).tolist() == [2, 2, 2, 2]
    assert np.bincount(reader.load("test").labels).tolist() == [1, 1, 1, 1]


def test_folder_cache_sees_an_image_replaced_in_place(tmp_path: Path, layouts, class_of_image) -> None:
    top = layouts.write_tiny_folder(tmp_path, layouts.tiny_members(WNIDS))
    cache = str(tmp_path / "cache")
    kwargs = dict(num_tasks=2, image_size=64, cache_dir=cache, class_order="natural")
    first = ClassIncrementalDataModule("tiny_imagenet", root=str(top), **kwargs)
    first.setup("test")
    target = top / "val" / "images" / "val_0.JPEG"  # class 0
    target.write_bytes(layouts.image_bytes(3, 7))  # now a class-3 picture, same name
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    second = ClassIncrementalDataModule("tiny_imagenet", root=str(top), **kwargs)
    second.setup("test")
    store = second.task_dataset(0, "test").store
    assert class_of_image(store.get(0)) == 3, "a stale cache entry was used"
    assert class_of_image(first.task_dataset(0, "test").store.get(0)) == 0
    assert len(list((tmp_path / "cache").glob("tiny_imagenet-test-*.npy"))) == 2

"""Zips read like folders, GTSRB's tracks kept whole, one error for every bad image, and the mixed-domain
scenario (each task from one source, proportional shares, recorded domains, blocked order)."""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ham_lightning.data import ClassIncrementalDataModule
from ham_lightning.data.image_store import BadImagesError
from ham_lightning.data.readers import build_reader
from ham_lightning.data.readers.base import ReadOptions, first_per_class, seeded_split, spread_per_class
from ham_lightning.data.readers.mixture import proportional_shares


def _zip_tree(folder: Path, archive: Path, top: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out.write(path, top + path.relative_to(folder).as_posix())
    return archive


def _presplit(root: Path, layouts, classes: list[str], train: int = 3, test: int = 2) -> Path:
    layouts.make_class_folders(root / "train", classes, train, suffix=".png")
    layouts.make_class_folders(root / "test", classes, test, suffix=".png")
    return root


@pytest.mark.parametrize("top", ["", "signs/"])
def test_a_zip_reads_like_the_same_folder(tmp_path: Path, layouts, class_of_image, top: str) -> None:
    folder = _presplit(tmp_path / "tree", layouts, ["cat", "dog", "emu"])
    archive = _zip_tree(folder, tmp_path / "tree.zip", top)
    with pytest.warns(UserWarning, match="single class"):  # one class a task: said, not refused
        from_folder = ClassIncrementalDataModule("image_folder", root=str(folder), num_tasks=3, image_size=8)
        from_zip = ClassIncrementalDataModule("image_folder", root=str(archive), num_tasks=3, image_size=8)
    assert from_zip.class_names == from_folder.class_names and from_zip.task_sizes == from_folder.task_sizes
    from_folder.setup()
    from_zip.setup()
    for split in ("train", "test"):
        a, b = from_folder._split(split), from_zip._split(split)
        assert len(a.store) == len(b.store) > 0 and a.labels.tolist() == b.labels.tolist()
        for i in range(len(a.store)):  # the same decoded pixels, with the same label
            assert np.array_equal(a.store.get(i).numpy(), b.store.get(i).numpy())
            assert class_of_image(b.store.get(i)) == from_zip.class_order[int(b.labels[i])]
    names = build_reader("image_folder", archive).load("train").names
    assert all(n.startswith(f"{archive}:{top}train/") for n in names)


def test_every_bad_image_of_a_split_is_named_in_one_error(tmp_path: Path, layouts) -> None:
    folder = _presplit(tmp_path / "tree", layouts, ["cat", "dog"], train=4)
    for name in ("cat/img_1.png", "dog/img_3.png"):
        path = folder / "train" / name
        path.write_bytes(path.read_bytes()[:40])
    archive = _zip_tree(folder, tmp_path / "tree.zip", "top/")
    for root in (folder, archive):
        with pytest.warns(UserWarning, match="single class"):
            data = ClassIncrementalDataModule("image_folder", root=str(root), num_tasks=2, image_size=8)
        with pytest.raises(BadImagesError) as info:
            data.setup()
        message = str(info.value)
        assert message.startswith("2 bad image(s)")
        assert "cat/img_1.png" in message and "dog/img_3.png" in message
        if root == archive:
            assert f"{archive}:top/train/cat/img_1.png" in message


def test_gtsrb_holds_out_whole_tracks(tmp_path: Path, layouts) -> None:
    root = tmp_path / "gtsrb"
    for split, per_track in (("train", 5), ("test", 2)):
        for label, cls in enumerate(["00", "01"]):
            for track in range(6):
                for frame in range(per_track):
                    layouts.write_image(root / split / cls / f"{track:05d}_{frame:05d}.png", label, frame)
    reader = build_reader("gtsrb", root)
    train = reader.load("train")
    assert reader.num_classes == 2 and len(np.unique(train.groups)) == 12
    with pytest.warns(UserWarning, match="single class"):
        data = ClassIncrementalDataModule("gtsrb", root=str(root), num_tasks=2, image_size=8, validation_fraction=0.3)
    fit, held = data._reader.load("train"), data._reader.load("test")
    track = lambda n: (Path(n).parent.name, Path(n).stem.split("_")[0])  # noqa: E731
    assert not {track(n) for n in fit.names} & {track(n) for n in held.names}
    assert 10 <= len(held.labels) <= 26  # about 30% of 60 frames, in whole tracks of 5
    assert not data.hparams["hflip_resolved"]  # a mirrored sign is another sign


def test_a_spread_cap_covers_every_track_where_the_first_n_cover_two(tmp_path: Path, layouts) -> None:
    root = tmp_path / "gtsrb"
    for label, cls in enumerate(["00", "01"]):
        for track in range(6):
            for frame in range(5):
                layouts.write_image(root / "train" / cls / f"{track:05d}_{frame:05d}.png", label, frame)
                layouts.write_image(root / "test" / cls / f"{track:05d}_{frame:05d}.png", label, frame)
    tracks = lambda data: Counter((Path(n).parent.name, Path(n).stem.split("_")[0]) for n in data.names)  # noqa: E731
    first = build_reader("gtsrb", root, ReadOptions(limit_per_class_train=6)).load("train")
    spread = build_reader("gtsrb", root, ReadOptions(limit_per_class_train=6, limit_mode="spread")).load("train")
    assert len(first.labels) == len(spread.labels) == 12
    assert len(tracks(first)) == 4 and len(tracks(spread)) == 12  # 2 tracks of each class against all 6
    assert spread.names == sorted(spread.names)  # reader order kept
    with pytest.raises(ValueError, match="limit_mode must be one of \\['first', 'spread'\\]"):
        ClassIncrementalDataModule("gtsrb", root=str(root), num_tasks=2, limit_mode="random")  # type: ignore[arg-type]


def test_spread_per_class_spaces_evenly_and_keeps_small_classes_whole() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [0] * 5)  # class 0's 15 samples are not contiguous
    kept = spread_per_class(labels, 4)
    assert kept.tolist() == [0, 5, 9, 10, 11, 12, 17]  # class 0: its 1st, 6th, 10th, 15th (at 17); class 1 whole
    assert kept.tolist() == sorted(kept.tolist())
    assert spread_per_class(labels, None).tolist() == list(range(18))
    assert first_per_class(labels, 4).tolist() == [0, 1, 2, 3, 10, 11, 12]


def test_a_mixture_source_can_spread_its_own_cap(tmp_path: Path, layouts) -> None:
    data = _mixture(tmp_path, layouts, num_tasks=5, limit_per_class_train=2)
    spread = ClassIncrementalDataModule("mixture", image_size=8, num_tasks=5, limit_per_class_train=2, sources=[
        {**s, "limit_mode": "spread"} if s["name"] == "A" else s for s in data.hparams["sources"]])
    a, b = data._reader.load("train"), spread._reader.load("train")
    from_a = lambda d: sorted(n for n in d.names if "/a/" in n)  # noqa: E731
    assert len(from_a(a)) == len(from_a(b)) == 12 and from_a(a) != from_a(b)
    assert sorted(n for n in a.names if "/a/" not in n) == sorted(n for n in b.names if "/a/" not in n)


def test_grouped_split_keeps_groups_whole_and_is_seeded() -> None:
    labels = np.repeat([0, 1], 40)
    groups = np.repeat(np.arange(16), 5)
    train, test = seeded_split(labels, 0.25, seed=3, groups=groups)
    assert not set(groups[train]) & set(groups[test])
    assert Counter(labels[test].tolist()) == {0: 10, 1: 10}
    again = seeded_split(labels, 0.25, seed=3, groups=groups)
    assert np.array_equal(test, again[1])


def test_proportional_shares() -> None:
    assert proportional_shares([43, 34, 10, 100], 10) == [2, 2, 1, 5]
    for total in (4, 10, 20, 50, 187):
        shares = proportional_shares([43, 34, 10, 100], total)
        assert sum(shares) == total and min(shares) >= 1 and all(s <= c for s, c in zip(shares, [43, 34, 10, 100]))


def _mixture(tmp_path: Path, layouts, **kwargs):
    a = _presplit(tmp_path / "a", layouts, [f"a{i}" for i in range(6)])
    b = _zip_tree(_presplit(tmp_path / "b", layouts, [f"b{i}" for i in range(3)]), tmp_path / "b.zip", "b/")
    c = _presplit(tmp_path / "c", layouts, [f"c{i}" for i in range(8)])
    sources = [{"dataset": "image_folder", "root": str(a), "name": "A"},
               {"dataset": "image_folder", "root": str(b), "name": "B"},
               {"dataset": "image_folder", "root": str(c), "name": "C", "classes": 4}]
    return ClassIncrementalDataModule("mixture", sources=sources, image_size=8, **kwargs)


def test_mixture_tasks_come_from_one_source_in_proportional_shares(tmp_path: Path, layouts) -> None:
    data = _mixture(tmp_path, layouts, num_tasks=5, seed=7)
    assert data.num_classes == 13  # 6 + 3 + the first 4 of C's seed order
    assert Counter(data.task_domains) == {"A": 2, "B": 1, "C": 2}
    assert sorted(c for t in range(data.num_tasks) for c in data.task_classes(t)) == list(range(13))
    names = data.class_names
    for task, domain in enumerate(data.task_domains):
        assert {names[c].split("/")[0] for c in data.task_classes(task)} == {domain}
    kept = sorted(names[k].split("/")[1] for k in range(13) if names[k].startswith("C/"))
    assert kept == sorted(f"c{i}" for i in np.random.RandomState(7).permutation(8)[:4])
    assert data.hparams["task_domains"] == data.task_domains
    data.setup()
    for task in range(data.num_tasks):  # every image carries its own class (tone of its source's class index)
        for split in ("train", "test"):
            ds = data.task_dataset(task, split)
            assert len(ds) > 0 and {int(y) for _, y in (ds[i] for i in range(len(ds)))} <= set(data.task_classes(task))


def test_mixture_blocked_order_and_seeded_interleaving(tmp_path: Path, layouts) -> None:
    blocked = _mixture(tmp_path, layouts, num_tasks=5, domain_order="blocked")
    assert blocked.task_domains == ["A", "A", "B", "C", "C"]
    orders = {tuple(_mixture(tmp_path, layouts, num_tasks=5, seed=s).task_domains) for s in range(6)}
    assert len(orders) > 1  # the seed interleaves the sources
    assert _mixture(tmp_path, layouts, num_tasks=5, seed=2).task_domains == \
        _mixture(tmp_path, layouts, num_tasks=5, seed=2).task_domains
    joint = _mixture(tmp_path, layouts, num_tasks=1)
    assert joint.task_sizes == [13]


def test_mixture_refuses_what_it_cannot_do(tmp_path: Path, layouts) -> None:
    with pytest.raises(ValueError, match="needs 1 \\(joint\\) or between 3 and 13 tasks"):
        _mixture(tmp_path, layouts, num_tasks=2)
    with pytest.raises(ValueError, match="drop increment, initial_classes and class_order"):
        _mixture(tmp_path, layouts, num_tasks=5, increment=2)
    with pytest.raises(ValueError, match="unknown key"):
        ClassIncrementalDataModule("mixture", sources=[{"dataset": "digits", "colour": 1}])
    with pytest.raises(ValueError, match="data.sources is for dataset='mixture'"):
        ClassIncrementalDataModule("digits", sources=[{"dataset": "digits"}])


def test_a_zips_cache_identity_is_its_bytes_not_its_time(tmp_path: Path, layouts) -> None:
    """A re-provisioned data folder (same bytes, new modification time) hits the same caches; new bytes do not."""
    folder = _presplit(tmp_path / "tree", layouts, ["cat", "dog"])
    archive = _zip_tree(folder, tmp_path / "tree.zip")
    stamp = build_reader("image_folder", archive).load("train").cache_stamp
    first = stamp()
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    assert build_reader("image_folder", archive).load("train").cache_stamp() == first
    donor = next((folder / "train" / "dog").glob("*.png"))
    (folder / "train" / "cat" / "extra.png").write_bytes(donor.read_bytes())
    _zip_tree(folder, archive)
    assert build_reader("image_folder", archive).load("train").cache_stamp() != first

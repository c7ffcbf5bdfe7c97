"""The on-disk prefix-activation cache behind ``ClassIncrementalDataModule(prefix_cache=...)``: cached outputs
equal uncached ones, the key changes with every input of the content (and only with those), damaged or stale
caches are rebuilt with a warning, epochs draw one fixed view per image."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ham_lightning.data.feature_cache as fc
from ham_lightning.core.prefix import PREFIX_KEY
from ham_lightning.data import ClassIncrementalDataModule
from ham_lightning.data.feature_cache import (
    CachedFeatures,
    FeatureCacheWarning,
    PrefixCacheConfig,
    epoch_view,
    key_digest,
    prefix_cache_key,
    view_input,
)

LITE0 = "tf_efficientnet_lite0"
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


def config(tmp_path: Path, **overrides: Any) -> PrefixCacheConfig:
    """Random-init Lite0 cut at blocks.5, two train views, in ``tmp_path/cache``."""
    args: dict[str, Any] = {"backbone": LITE0, "adapt_from": "blocks.5", "pretrained": False, "views": 2,
                            "cache_dir": str(tmp_path / "cache"), "progress": False}
    return PrefixCacheConfig(**{**args, **overrides})


def digits(prefix_cache: PrefixCacheConfig | dict | None, **kwargs: Any) -> ClassIncrementalDataModule:
    """10 digit classes, 3 train and 2 test images each, 32 px, 5 tasks."""
    args: dict[str, Any] = {"num_tasks": 5, "image_size": 32, "limit_per_class_train": 3, "limit_per_class_test": 2,
                            "batch_size": 8}
    dm = ClassIncrementalDataModule("digits", prefix_cache=prefix_cache, **{**args, **kwargs})
    dm.setup()
    return dm


def entry(dm: ClassIncrementalDataModule, split: str) -> CachedFeatures:
    features = dm._splits[split].features  # type: ignore[arg-type]
    assert features is not None
    return features


def manifest_of(features: CachedFeatures) -> dict[str, Any]:
    return json.loads(features.path.with_suffix(".json").read_text())


def live_split(cfg: PrefixCacheConfig):
    """The same backbone built again, in the default memory format: the uncached reference."""
    return replace(cfg, channels_last=False).build_split()


# ---- cached == uncached -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "point", "kwargs"), [(LITE0, "blocks.5", {}), ("vit_tiny_patch16_224",
                                                                                    "blocks.1", TINY_VIT)])
def test_cached_outputs_equal_uncached_ones(tmp_path: Path, backbone: str, point: str, kwargs: dict) -> None:
    cfg = config(tmp_path, backbone=backbone, adapt_from=point, model_kwargs=kwargs, dtype="float32")
    dm = digits(cfg)
    split = live_split(cfg)
    model = split.model
    plain = digits(None, backbone=backbone)  # the uncached datamodule of the same scenario
    for cached_loader, image_loader in zip(dm.test_dataloader(), plain.test_dataloader(), strict=True):
        for (x, y), (images, y_plain) in zip(cached_loader, image_loader, strict=True):
            assert set(x) == {PREFIX_KEY} and torch.equal(y, y_plain)
            torch.testing.assert_close(split.top(x[PREFIX_KEY]), model(images), atol=1e-5, rtol=1e-5)
    # train views: view v of image i is the prefix of the train transform under the seed of (view_seed, i, v)
    features, store = entry(dm, "train"), dm._splits["train"].store
    assert features.views == 2
    for index in (0, 7, len(features) - 1):
        for view in range(2):
            image = view_input(store, index, view, dm.train_transform, cfg.view_seed)
            torch.testing.assert_close(features.get(index, view), split.prefix(image[None])[0], atol=1e-5, rtol=1e-5)
    assert not torch.equal(features.get(0, 0), features.get(0, 1))  # two different augmentations


def test_float16_storage_is_the_rounded_prefix(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    dm = digits(cfg)
    features = entry(dm, "test")
    assert features.array.dtype == np.float16 and features.shape == (112, 2, 2)
    split = live_split(cfg)
    store = dm._splits["test"].store
    images = torch.stack([view_input(store, i, 0, dm.eval_transform, None) for i in range(len(features))])
    live = split.prefix(images)
    cached = torch.stack([features.get(i) for i in range(len(features))])
    torch.testing.assert_close(cached, live.half().float(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(split.top(cached), split.model(images), atol=2e-2, rtol=1e-2)


def test_loaders_serve_the_same_labels_and_order_as_the_image_path(tmp_path: Path) -> None:
    dm, plain = digits(config(tmp_path)), digits(None, backbone=LITE0)
    for task in (0, 3):
        dm.set_task(task)
        plain.set_task(task)
        cached = [y for _, y in dm.train_dataloader()]
        images = [y for _, y in plain.train_dataloader()]
        assert torch.equal(torch.cat(cached), torch.cat(images))
        assert set(torch.cat(cached).tolist()) == set(dm.task_classes(task))
    x, _ = next(iter(dm.train_dataloader()))
    assert x[PREFIX_KEY].dtype == torch.float32 and x[PREFIX_KEY].shape[1:] == (112, 2, 2)


def test_an_epoch_draws_one_fixed_view_per_image(tmp_path: Path) -> None:
    cfg = config(tmp_path, views=3)
    a, b = digits(cfg), digits(cfg)
    features = entry(a, "train")
    dataset = a.task_dataset(0, "train")
    generator = torch.Generator().manual_seed(5)
    from ham_lightning.data.sampler import TaskRandomSampler

    seen_views: set[int] = set()
    for key in list(TaskRandomSampler(dataset, generator))[:6]:
        x, _ = dataset[key]
        index = int(dataset.indices[key[0]])
        view = epoch_view(key[1], index, 3)
        seen_views.add(view)
        assert torch.equal(x[PREFIX_KEY], features.get(index, view))
    epochs_a = [torch.cat([x[PREFIX_KEY] for x, _ in a.train_dataloader()]) for _ in range(3)]
    epochs_b = [torch.cat([x[PREFIX_KEY] for x, _ in b.train_dataloader()]) for _ in range(3)]
    assert all(torch.equal(ea, eb) for ea, eb in zip(epochs_a, epochs_b, strict=True))  # same views everywhere
    assert not torch.equal(epochs_a[0], epochs_a[1])
    views_used = {epoch_view(s, i, 3) for s in range(20) for i in range(6)}
    assert views_used == {0, 1, 2}


# ---- the key ------------------------------------------------------------------------------------------------


def _key(cfg: PrefixCacheConfig, **overrides: Any) -> str:
    args: dict[str, Any] = {"dataset": "digits", "split": "train", "split_name": "seeded_80_20",
                            "data_identity": "abc", "num_images": 30,
                            "transform_key": {"data_config": {"image_size": 32}, "kind": "train", "crop": "pad"},
                            "augmented": True}
    return key_digest(prefix_cache_key(cfg, **{**args, **overrides}))


def test_the_key_changes_with_every_input_of_the_content(tmp_path: Path, monkeypatch) -> None:
    cfg = config(tmp_path)
    base = _key(cfg)
    checkpoint = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, checkpoint)
    changed = {
        "dataset": _key(cfg, dataset="cifar100"),
        "split": _key(cfg, split="test"),
        "split_name": _key(cfg, split_name="seeded_70_30"),
        "data identity": _key(cfg, data_identity="abd"),
        "number of images": _key(cfg, num_images=31),
        "resolution": _key(cfg, transform_key={"data_config": {"image_size": 48}, "kind": "train", "crop": "pad"}),
        "augmentation": _key(cfg, transform_key={"data_config": {"image_size": 32}, "kind": "train",
                                                 "crop": "resized"}),
        "unaugmented": _key(cfg, augmented=False),
        "backbone": _key(replace(cfg, backbone="tf_efficientnet_lite1")),
        "pretrained": _key(replace(cfg, pretrained=True)),
        "checkpoint": _key(replace(cfg, checkpoint_path=str(checkpoint))),
        "init seed": _key(replace(cfg, init_seed=1)),
        "model kwargs": _key(replace(cfg, model_kwargs={"drop_rate": 0.1})),
        "point": _key(replace(cfg, adapt_from="blocks.6")),
        "fine point": _key(replace(cfg, adapt_from="blocks.5.1")),
        "views": _key(replace(cfg, views=3)),
        "view seed": _key(replace(cfg, view_seed=1)),
        "dtype": _key(replace(cfg, dtype="float32")),
    }
    monkeypatch.setattr(fc, "CACHE_FORMAT_VERSION", fc.CACHE_FORMAT_VERSION + 1)
    changed["format version"] = _key(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(fc, "library_versions", lambda: {"timm": "0.0.0", "torchvision": "0.0.0"})
    changed["timm version"] = _key(cfg)
    monkeypatch.undo()
    assert all(digest != base for digest in changed.values()), [k for k, d in changed.items() if d == base]
    assert len(set(changed.values())) == len(changed)
    # what does not change the content keeps the key
    same = [replace(cfg, cache_dir=str(tmp_path / "elsewhere")), replace(cfg, batch_size=3, device="cpu"),
            replace(cfg, adapt_from="blocks.5.0"), replace(cfg, also_build=("blocks.6",)),
            replace(cfg, channels_last=False, verify_checksum=False, num_workers=2)]
    assert {_key(c) for c in same} == {base}
    torch.save({"w": torch.ones(1)}, checkpoint)  # other weights in the same file
    assert _key(replace(cfg, checkpoint_path=str(checkpoint))) != changed["checkpoint"]


def test_the_scenario_around_the_data_does_not_change_the_key(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    a = digits(cfg)
    b = digits(cfg, seed=7, num_tasks=2, batch_size=4)  # another class order, task split and batch size
    assert entry(a, "train").path == entry(b, "train").path
    assert b._splits["train"].store._store is None  # a cache hit decodes no image
    c = digits(cfg, limit_per_class_train=4)
    assert entry(c, "train").path != entry(a, "train").path
    assert entry(c, "test").path == entry(a, "test").path


def test_a_copied_or_relative_zip_hits_the_cache_and_changed_content_misses(tmp_path: Path, layouts,
                                                                           monkeypatch) -> None:
    cfg = config(tmp_path, views=1)
    zip_path = layouts.write_tiny_zip(tmp_path / "data" / "tiny-imagenet-200.zip", layouts.tiny_members())

    def tiny(root: str) -> ClassIncrementalDataModule:
        dm = ClassIncrementalDataModule("tiny_imagenet", root=root, num_tasks=2, image_size=32, augment=False,
                                        prefix_cache=cfg)
        dm.setup()
        return dm

    first = entry(tiny(str(zip_path)), "test").path
    monkeypatch.chdir(tmp_path / "data")
    assert entry(tiny("tiny-imagenet-200.zip"), "test").path == first
    copy = tmp_path / "copy" / "tiny-imagenet-200.zip"
    copy.parent.mkdir()
    shutil.copy(zip_path, copy)
    os.utime(copy, (1, 1))  # another path and modification time, the same bytes
    assert entry(tiny(str(copy)), "test").path == first
    members = layouts.tiny_members()
    members["val/images/val_0.JPEG"] = layouts.image_bytes(3, 999)  # one image replaced
    layouts.write_tiny_zip(copy, members)
    assert entry(tiny(str(copy)), "test").path != first


# ---- damaged and stale caches -------------------------------------------------------------------------------


def _rebuilt_with_warning(tmp_path: Path, damage, match: str) -> None:
    cfg = config(tmp_path)
    features = entry(digits(cfg), "train")
    original = manifest_of(features)
    damage(features.path)
    with pytest.warns(FeatureCacheWarning, match=match) as record:
        again = entry(digits(cfg), "train")
    assert str(features.path) in str(record[0].message) and "rebuilding" in str(record[0].message)
    rebuilt = manifest_of(again)
    assert rebuilt["sha256"] == original["sha256"]  # the same content, built again
    assert again.path.stat().st_size == original["file_bytes"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        digits(cfg)  # and now it is used without a word


def test_a_truncated_file_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    _rebuilt_with_warning(tmp_path, lambda p: os.truncate(p, p.stat().st_size - 100), "truncated")


def test_a_longer_file_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    def append(path: Path) -> None:
        with open(path, "ab") as f:
            f.write(b"\0" * 64)

    _rebuilt_with_warning(tmp_path, append, "wrong size")


def test_a_wrong_checksum_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    def flip(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(-10, os.SEEK_END)
            byte = f.read(1)
            f.seek(-10, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))

    _rebuilt_with_warning(tmp_path, flip, "checksum does not match")


def test_a_stale_key_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    def stale(path: Path) -> None:
        manifest = json.loads(path.with_suffix(".json").read_text())
        manifest["key"]["views"] = 5
        path.with_suffix(".json").write_text(json.dumps(manifest))

    _rebuilt_with_warning(tmp_path, stale, r"stale: its key differs in \['views'\]")


def test_a_missing_or_unreadable_manifest_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    _rebuilt_with_warning(tmp_path, lambda p: p.with_suffix(".json").unlink(), "no manifest")
    shutil.rmtree(tmp_path / "cache")
    _rebuilt_with_warning(tmp_path, lambda p: p.with_suffix(".json").write_text("{not json"), "unreadable")


def test_a_killed_build_leaves_nothing_that_is_used(tmp_path: Path, monkeypatch) -> None:
    cfg = config(tmp_path)
    real = fc.compute_features

    def dies(paths, *args, **kwargs):
        real(paths, *args, **kwargs)
        raise KeyboardInterrupt  # after writing the temporary files, before they are moved in place

    monkeypatch.setattr(fc, "compute_features", dies)
    with pytest.raises(KeyboardInterrupt):
        digits(cfg)
    cache = tmp_path / "cache"
    assert not list(cache.glob("*.npy")) and not list(cache.glob("*.json"))
    for lock in cache.glob("*.lock"):  # what a SIGKILLed build leaves: its temporary array
        (cache / f"{lock.name[:-len('.lock')]}.tmp-99999.npy").write_bytes(b"\x93NUMPY half")
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was there: a plain first build
        digits(cfg)
    assert not list(cache.glob("*.tmp-*"))


def test_temporaries_of_killed_builds_are_deleted_but_not_those_of_a_running_build(tmp_path: Path) -> None:
    from filelock import FileLock

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = [cache / "digits-train-x-blocks.6-aaaa.tmp-4242.npy", cache / "digits-train-x-blocks.6-aaaa.json.tmp-4242",
            cache / "other-bbbb.tmp-17.npy"]
    running = cache / "digits-test-x-blocks.6-cccc.tmp-99.npy"
    kept = [cache / "digits-train-x-blocks.6-aaaa.npy", cache / "notes.txt"]
    for path in [*dead, running, *kept]:
        path.write_bytes(b"x")
    with FileLock(str(cache / "digits-test-x-blocks.6-cccc.lock")):  # a build of that entry in progress
        removed = fc.remove_stale_temporaries(cache)
    assert sorted(removed) == sorted(dead)
    assert not any(p.exists() for p in dead) and running.exists() and all(p.exists() for p in kept)
    assert fc.remove_stale_temporaries(cache) == [running]  # once that build has ended


def test_also_build_fills_sibling_points_in_one_pass(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    real = fc.compute_features

    def counting(paths, *args, **kwargs):
        calls.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(fc, "compute_features", counting)
    digits(config(tmp_path, also_build=("blocks.6", "blocks.5.0")))
    assert calls == [2, 2]  # train and test, each one pass for blocks.5 and blocks.6
    six = digits(config(tmp_path, adapt_from="blocks.6"))
    assert calls == [2, 2] and entry(six, "train").shape == (192, 1, 1)
    split = live_split(config(tmp_path, adapt_from="blocks.6"))
    store = six._splits["test"].store
    image = view_input(store, 3, 0, six.eval_transform, None)
    torch.testing.assert_close(entry(six, "test").get(3), split.prefix(image[None])[0].half().float(), atol=1e-3,
                               rtol=1e-3)  # one float16 step at most: the build runs channels-last


# ---- configuration ------------------------------------------------------------------------------------------


def test_bad_configurations_fail_early(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="identical views; set views=1"):
        ClassIncrementalDataModule("digits", augment=False, prefix_cache=config(tmp_path, views=3))
    with pytest.raises(ValueError, match=r"unknown keys \['view'\]"):
        ClassIncrementalDataModule("digits", prefix_cache={"backbone": LITE0, "adapt_from": "blocks.5", "view": 2})
    with pytest.raises(ValueError, match="must look like 'blocks.5'"):
        config(tmp_path, adapt_from="layer4")
    with pytest.raises(ValueError, match="views must be a positive integer"):
        config(tmp_path, views=0)
    with pytest.raises(ValueError, match="Valid points"):
        digits(config(tmp_path, adapt_from="blocks.9"))  # checked against the model when the cache is built


def test_a_dict_config_and_the_backbone_default(tmp_path: Path) -> None:
    dm = ClassIncrementalDataModule("digits", num_tasks=5, prefix_cache={
        "backbone": LITE0, "adapt_from": "blocks.6", "pretrained": False, "cache_dir": str(tmp_path)})
    assert isinstance(dm.prefix_cache, PrefixCacheConfig) and dm.prefix_cache.views == 4
    assert dm.data_config.mean == (0.5, 0.5, 0.5)  # the transforms follow the prefix's backbone (Lite0's)
    assert dm.hparams["prefix_cache"]["adapt_from"] == "blocks.6"
    assert ClassIncrementalDataModule("digits", num_tasks=5).prefix_cache is None

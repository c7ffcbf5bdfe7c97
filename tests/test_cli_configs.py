"""Every shipped config trains: one training step of ``ham-lightning fit --config configs/<name>.yaml`` on a tiny
fixture in its data set's on-disk layout, with a randomly initialised backbone of the config's architecture
(same timm name, ``pretrained=false``; ViT-B/16 with one block), everything else as shipped (image size, targets,
head, optimizer), on CPU in float32."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import yaml

from ham_lightning.cli import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _layouts():
    """The builders of tests/data/conftest.py (the real on-disk layouts of every data set)."""
    spec = importlib.util.spec_from_file_location("data_layouts", ROOT / "tests" / "data" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _fixture(dataset: str, tmp: Path) -> str | None:
    """A root holding a tiny copy of ``dataset`` with enough classes for 10, 20 and 50 tasks."""
    layouts = _layouts()
    if dataset == "digits":
        return None
    if dataset == "cifar100":
        layouts.make_cifar100(tmp, train_per_class=1, test_per_class=1)
        return str(tmp / "cifar-100-python")
    if dataset == "tiny_imagenet":
        wnids = [f"n{10000000 + k:08d}" for k in range(100)]
        return str(layouts.write_tiny_zip(tmp / "tiny-imagenet-200.zip",
                                          layouts.tiny_members(wnids, train_per_class=1, val_per_class=1,
                                                               grey=False)))
    if dataset == "cub200":
        classes = [f"{k + 1:03d}.Bird_{k}" for k in range(20)]
        return str(layouts.make_cub(tmp, per_class=2, classes=classes))
    if dataset == "imagenet_r":
        # 40 classes: two a task at 20 tasks (a single-class task would be warned about)
        layouts.make_class_folders(tmp / "imagenet-r", [f"n{20000000 + k:08d}" for k in range(40)], per_class=5)
        return str(tmp / "imagenet-r")
    if dataset in ("gtsrb", "dtd", "image_folder"):
        # pre-split class folders (GTSRB's <track>_<frame> names), 20 classes: 2 a task at 10 tasks
        for split in ("train", "test"):
            for label in range(20):
                for k in range(2):
                    layouts.write_image(tmp / dataset / split / f"{label:02d}" / f"{k:05d}_00000.png", label, k)
        return str(tmp / dataset)
    raise AssertionError(f"no fixture for {dataset}: add one when shipping its config")


def _sources(shipped: dict, tmp: Path) -> str:
    """A mixture config's sources pointed at tiny fixtures of each source's data set."""
    sources = []
    for k, source in enumerate(shipped["data"]["sources"]):
        root = _fixture(source["dataset"], tmp / f"source{k}")
        sources.append({**source, "root": root, "classes": min(source.get("classes") or 12, 12)})
    return json.dumps(sources)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HAM_LIGHTNING_CACHE", str(tmp_path / "cache"))  # prefix caches of this test only
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_runs_a_training_step_on_its_layout(config: Path, tmp_path: Path) -> None:
    shipped = yaml.safe_load(config.read_text())
    dataset = shipped["data"]["dataset"]
    root = None if dataset == "mixture" else _fixture(dataset, tmp_path / "data")
    args = ["fit", "--config", str(config), "--model.pretrained=false", "--data.batch_size=2",
            "--data.num_workers=0", "--trainer.max_steps=1", "--trainer.logger=false", "--merge.evaluate=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--run_name=step",
            "--trainer.precision=32-true"]  # bf16 autocast is emulated (slow) on most CPUs
    if dataset == "mixture":
        args.append(f"--data.sources={_sources(shipped, tmp_path / 'data')}")
    elif root is not None:
        args.append(f"--data.root={root}")
    else:  # digits ships whole: a few images per class, so the prefix cache is built in a second
        args += ["--data.limit_per_class_train=2", "--data.limit_per_class_test=1"]
    if shipped["model"]["backbone"].startswith("vit_base"):
        # One of the 12 blocks: the same patch size, width, input size and module names (qkv, fc1, fc2), at a
        # twelfth of the cost; the image size check below is what the full depth would add nothing to.
        args.append('--model.backbone_kwargs={"depth": 1}')
    run = cli(args)
    assert run.trainer.global_step == 1
    # The image size is the config's, else the backbone's own (224 for ViT-B/16): no quick-start leak.
    expected = shipped["data"].get("image_size") or timm.models.get_pretrained_cfg(
        shipped["model"]["backbone"]).input_size[-1]
    assert run.datamodule.data_config.image_size == expected
    assert run.model.hparams.head == shipped["model"].get("head", "linear")
    # The optimizer runs as the config reads: a config naming an optimizer class states its weight decay, since
    # jsonargparse would otherwise keep the module default AdamW's 0.01 (Adam would add it to the gradient).
    optimizer = shipped["model"].get("optimizer")
    if optimizer is not None:
        assert "weight_decay" in optimizer.get("init_args", {}), f"{config.name}: state optimizer weight_decay"
        built = run.trainer.optimizers[0]
        assert type(built).__name__ == optimizer["class_path"].rsplit(".", 1)[-1]
        assert built.param_groups[0]["weight_decay"] == optimizer["init_args"]["weight_decay"]

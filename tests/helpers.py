"""Shared helpers: tiny randomly initialised timm models (a module, not a fixture file: tests import it by name)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

import ham_lightning

if TYPE_CHECKING:
    import pytest


def tiny_vit(**kwargs) -> nn.Module:
    """A 2-block ViT on 32 px images with 8 px patches: seconds on CPU, same module names as ViT-B/16."""
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=0, embed_dim=48, num_heads=2)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args)


def tiny_efficientnet() -> nn.Module:
    """Random-weight `tf_efficientnet_lite0` (3.4 M parameters; 32 pointwise 1x1 convs), used at 32 px."""
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)


@torch.no_grad()
def perturb(controller: ham_lightning.HAMController, scale: float = 0.1, generator: torch.Generator | None = None
            ) -> None:
    """Random changes to every trainable HAM parameter (factors and scalars), as training would make."""
    for p in controller.adapter_parameters() + controller.scalar_parameters():
        p.add_(torch.randn(p.shape, generator=generator) * scale)


def offline_wandb(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    """W&B offline and silent with no API key, runs written under ``workdir`` (the CLI and compare tests)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(workdir)


def mounted_tmpfs(path: Path, size: str) -> Path:
    """A fresh tmpfs of ``size`` (``"64m"``) mounted at ``path`` (unmount with `unmount`); skips the test, with
    the reason, where mounting is impossible (not root, no mount permission in this container)."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (and the mount command); this test runs the run folder on one")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    return path


def unmount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (the scripts are not a package; they import each other
    by name, so it is registered in ``sys.modules``)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module

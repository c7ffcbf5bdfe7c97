"""The prefix cut has one owner: ``model.ham.adapt_from`` sets the cache's (``data.prefix_cache.adapt_from``), and a
config that sets both differently is refused naming both."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import offline_wandb
from test_cli import TINY

from ham_lightning.cli import cli

CACHE = {"backbone": "vit_tiny_patch16_224", "pretrained": False, "views": 1, "progress": False,
         "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}}


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline_wandb(monkeypatch, tmp_path)


def config_file(tmp_path: Path, cache: dict) -> str:
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump({"data": {"prefix_cache": {**CACHE, **cache, "cache_dir": str(tmp_path / "c")},
                                             "augment": False}}))
    return str(path)


def test_the_model_cut_sets_the_cache_cut(tmp_path: Path) -> None:
    built = cli([*[a for a in TINY if not any(k in a for k in ("prefix_cache", "adapt_from", "head_kwargs"))],
                 "--config", config_file(tmp_path, {}), "--model.ham.adapt_from=blocks.1",
                 f"--runs_dir={tmp_path / 'runs'}"], run=False)
    assert built.datamodule.prefix_cache.adapt_from == "blocks.1"
    # What config.yaml and the checkpoint keep: the cut written out, so a resume compares like with like.
    assert built.clean_config["data"]["prefix_cache"]["adapt_from"] == "blocks.1"
    built.release()


@pytest.mark.parametrize(("model_cut", "cache_cut", "shown"), [
    ("blocks.1", "blocks.0", "The prefix cut is set twice: --model.ham.adapt_from blocks.1 and "
                             "--data.prefix_cache.adapt_from blocks.0"),
    (None, None, "--data.prefix_cache caches the frozen part below the adapted one: set --model.ham.adapt_from"),
])
def test_two_different_cuts_are_refused_naming_both(model_cut: str | None, cache_cut: str | None, shown: str,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [a for a in TINY if not any(k in a for k in ("prefix_cache", "adapt_from", "head_kwargs"))]
    with pytest.raises(SystemExit):
        cli([*args, "--config", config_file(tmp_path, {"adapt_from": cache_cut} if cache_cut else {}),
             f"--model.ham.adapt_from={model_cut or 'null'}", f"--runs_dir={tmp_path / 'runs'}"], run=False)
    assert shown in capsys.readouterr().err.replace("\n", " ")


def test_hammodule_refuses_a_datamodule_cut_elsewhere() -> None:
    from types import SimpleNamespace

    from helpers import tiny_vit

    import ham_lightning as hl

    module = hl.HAMModule(backbone=tiny_vit(), num_classes=4, ham={"target_modules": ["fc1"], "adapt_from": "blocks.1"})
    datamodule = SimpleNamespace(prefix_cache=SimpleNamespace(adapt_from="blocks.0"))
    module.trainer = SimpleNamespace(datamodule=datamodule)  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"cut at 'blocks.0' \(prefix_cache.adapt_from\) but the model adapts from "
                                         r"'blocks.1' \(ham.adapt_from\)"):
        module.on_fit_start()
    datamodule.prefix_cache.adapt_from = "blocks.1.0"  # the same block, another spelling
    module.on_fit_start()

"""``ham-lightning``: a tiny sequence end to end, config errors before training, every shipped config parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import offline_wandb
from PIL import Image

from ham_lightning.cli import cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

TINY = [
    "--model.backbone=vit_tiny_patch16_224", "--model.pretrained=false",
    '--model.backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}',
    "--model.ham.target_modules=[qkv, fc1, fc2]", "--model.ham.max_groups=2", "--model.ham.rank=4",
    "--data.dataset=digits", "--data.num_tasks=5", "--data.image_size=32", "--data.epochs_per_task=1",
    "--data.limit_per_class_train=8", "--data.limit_per_class_test=4", "--data.batch_size=16",
    "--trainer.accelerator=cpu", "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline_wandb(monkeypatch, tmp_path)


def test_fit_writes_results_report_plots_and_offline_wandb(tmp_path: Path) -> None:
    cli(["fit", *TINY, "--run_name=tiny", f"--runs_dir={tmp_path / 'runs'}", "--benchmark=test"])
    run = tmp_path / "runs" / "tiny"
    results = json.loads((run / "results.json").read_text())
    matrix = results["accuracy_matrix"]
    T = 5
    assert [len(row) for row in matrix] == [T] * T
    assert all((matrix[i][j] is None) == (j > i) for i in range(T) for j in range(T))
    assert results["last_accuracy"] == pytest.approx(results["incremental_accuracy"][-1])
    final = matrix[-1]
    assert results["forgetting"] == pytest.approx(
        sum(max(matrix[i][j] for i in range(j, T - 1)) - final[j] for j in range(T - 1)) / (T - 1))
    assert results["bwt"] == pytest.approx(sum(final[j] - matrix[j][j] for j in range(T - 1)) / (T - 1))
    groups = results["groups"]
    assert len(groups["assignment"]) == T and max(groups["assignment"]) < 2
    assert len(results["tasks"]) == T and all(t["wall_time_s"] > 0 for t in results["tasks"])
    assert results["params"]["trainable"] > 0 and results["params"]["stored_adapter"] > 0
    assert results["config"]["model"]["ham"]["max_groups"] == 2  # the resolved config
    for name in ("accuracy_matrix", "accuracy_over_tasks", "groups"):
        with Image.open(run / f"{name}.png") as image:
            assert image.size[0] > 300
    assert "Last accuracy" in (run / "report.md").read_text() or "last accuracy" in (run / "report.md").read_text()
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run folder"
    assert list(run.rglob("metrics.csv")), "no CSV log"
    assert (run / "checkpoints" / "last.ckpt").exists()

    # `test` on the final checkpoint re-evaluates every task: the accuracy matrix's last row.
    tested = cli(["test", *TINY, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--run_name=tiny-test",
                  f"--runs_dir={tmp_path / 'runs'}"])
    metrics = tested.trainer.callback_metrics
    for j in range(T):
        assert 100 * float(metrics[f"test/acc_task_{j}"]) == pytest.approx(final[j], abs=1e-4)


def test_config_errors_fail_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["fit", *TINY, "--model.ham.not_a_knob=3"])
    assert "not_a_knob" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["fit", *TINY, "--model.ham.rank=eight"])
    assert "rank" in capsys.readouterr().err
    with pytest.raises((ValueError, FileNotFoundError), match="tiny-imagenet-200"):
        cli(["fit", *TINY, "--data.dataset=tiny_imagenet", f"--data.root={tmp_path / 'missing'}",
             "--data.num_tasks=10", "--data.limit_per_class_train=null", "--data.limit_per_class_test=null"])
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("results.json"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_parse(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "merge:" in printed

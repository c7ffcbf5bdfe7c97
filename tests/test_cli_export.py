"""``ham-lightning export`` and ``ham-lightning compare``: from what runs left behind, nothing re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from helpers import offline_wandb
from PIL import Image
from safetensors.torch import load_file

from ham_lightning.cli import cli
from ham_lightning.core.backbones import create_backbone
from ham_lightning.lightning.module import HAMModule

LITE0 = [
    "--model.backbone=tf_efficientnet_lite0", "--model.pretrained=true", "--model.head=cosine",
    "--model.ham.target_modules=[conv_pw, conv_pwl, conv_head]", "--model.ham.max_groups=2", "--model.ham.rank=4",
    "--data.dataset=digits", "--data.num_tasks=5", "--data.image_size=32", "--data.epochs_per_task=1",
    "--data.limit_per_class_train=8", "--data.limit_per_class_test=2", "--data.batch_size=16",
    "--trainer.accelerator=cpu", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
    "--trainer.logger=false", "--data.prefix_cache=null",  # the prefix runs in forward: nothing cached
]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline_wandb(monkeypatch, tmp_path)


def test_export_round_trip_on_the_pristine_lite0_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PEFT adapter on the package's own Lite0 weights, and the folded state dict in a plain timm model,
    reproduce the trained HAM model's features and logits (BatchNorm statistics frozen from the first step)."""
    from peft import PeftModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any download attempt fails at once
    cli(["fit", *LITE0, "--run_name=lite0"])
    run = tmp_path / "runs" / "lite0"
    files = cli(["export", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert files["peft_adapter"] == run / "export" / "peft_adapter"
    adapter_config = json.loads((files["peft_adapter"] / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tf_efficientnet_lite0"
    info = json.loads(files["info"].read_text())
    assert info["norm_buffers_moved"] is False and "base_buffers" not in files
    assert info["seen_classes"] == list(range(10))

    trained = HAMModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = trained.backbone(x)
        logits = trained.head.eval_logits(trained(x))

        pristine = create_backbone("tf_efficientnet_lite0", pretrained=True).eval()
        peft_model = PeftModel.from_pretrained(pristine, str(files["peft_adapter"])).eval()
        assert (peft_model(x) - features).abs().max() < 1e-4
        # The README's recipe as printed (offline: the packaged weights), on this run's export.
        recipe = _readme_peft_recipe().replace("runs/quickstart/", f"{run}/")
        namespace: dict = {}
        exec(compile(recipe, "README.md", "exec"), namespace)
        assert (namespace["model"](x) - features).abs().max() < 1e-4
    assert info["pretrained"] is True  # what the run trained from (export itself builds without weights)
    assert info["base"] == "create_backbone('tf_efficientnet_lite0', pretrained=True)"
    with torch.no_grad():
        plain = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
        plain.load_state_dict(load_file(files["backbone_folded"]))
        folded = plain(x)
        assert (folded - features).abs().max() < 1e-4
        head = type(trained.head)(**_head_args(trained))
        head.load_state_dict(load_file(files["head"]))
        assert torch.equal(head.eval_logits(head(folded)).argmax(1), logits.argmax(1))


def _readme_peft_recipe() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (recipe,) = [b for b in blocks if "PeftModel.from_pretrained" in b]
    return recipe


def _head_args(model: HAMModule) -> dict:
    head = model.head
    return {"in_features": head.linear.in_features, "num_classes": head.num_classes, "kind": head.kind,
            "scale": head.scale}


def test_export_refuses_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["export", f"--ckpt_path={tmp_path / 'nope.ckpt'}"])
    assert "no such file" in capsys.readouterr().err


def _fake_run(runs: Path, name: str, method: str, accuracies: list[float]) -> Path:
    folder = runs / name
    folder.mkdir(parents=True)
    T = len(accuracies)
    results = {"method": method, "dataset": "digits", "run": {"run_name": name},
               "accuracy_matrix": [[a] * (i + 1) + [None] * (T - i - 1) for i, a in enumerate(accuracies)],
               "incremental_accuracy": accuracies, "last_accuracy": accuracies[-1],
               "average_incremental_accuracy": sum(accuracies) / T, "forgetting": 10.0, "bwt": -10.0,
               "fit_wall_time_s": 12.5}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_compare_runs_table_and_plot_from_results_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    a = _fake_run(runs, "a", "ham", [90.0, 70.0, 60.0])
    b = _fake_run(runs, "b", "seq_lora", [95.0, 50.0, 30.0])
    results_b = json.loads((b / "results.json").read_text())
    results_b["errors"] = {"images": 100, "wrong": 70.0, "within_task": 10.0, "to_later_task": 45.0,
                           "to_earlier_task": 15.0, "confusions": []}
    (b / "results.json").write_text(json.dumps(results_b))
    (runs / "unfinished" / "checkpoints").mkdir(parents=True)
    (runs / "quickstart-predict").mkdir()
    (runs / "quickstart-predict" / "predictions.csv").write_text("task,index\n")
    result = cli(["compare", str(a), str(b), str(runs / "unfinished"), str(runs / "quickstart-predict"), "--out",
                  str(tmp_path / "cmp")])
    captured = capsys.readouterr()
    assert f"skipped, unfinished (no results.json yet): {runs / 'unfinished'}" in captured.err
    assert f"skipped, not fit runs: {runs / 'quickstart-predict'}" in captured.err
    assert [r["run"] for r in result["rows"]] == ["a", "b"]  # best last accuracy first
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| a | ham | digits | 3 | 60.00 | 73.33 | 10.00 | -10.00 | - | - / - | 12 |" in table  # no errors kept
    assert "| b | seq_lora | digits | 3 | 30.00 | 58.33 | 10.00 | -10.00 | 10.00 | 45.00 / 15.00 | 12 |" in table
    assert table.strip() in captured.out
    with Image.open(tmp_path / "cmp" / "compare.png") as image:
        assert image.size[0] > 500
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())[1]["last_accuracy"] == 30.0


def test_compare_writes_under_the_runs_folder_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    _fake_run(runs, "a", "ham", [90.0, 70.0])
    _fake_run(runs, "b", "ncm", [80.0, 75.0])
    cli(["compare", *sorted(str(p) for p in runs.iterdir())])
    assert sorted(p.name for p in (runs / "comparison").iterdir()) == ["compare.json", "compare.md", "compare.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing in the working tree's top level
    capsys.readouterr()
    cli(["compare", *sorted(str(p) for p in runs.iterdir())])  # runs/* now holds runs/comparison: passed over
    assert "skipped" not in capsys.readouterr().err

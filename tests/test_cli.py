"""``ham-lightning``: a tiny sequence end to end, config errors before training, every shipped config parses."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
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
    "--model.ham.adapt_from=null", "--data.prefix_cache=null",  # the quick start caches a prefix to blocks.6
    # The quick start's ridge head, 256 wide: at 2048 its float64 eigendecompositions were most of a tiny run's time.
    '--model.head_kwargs={"projection": 256}',
    "--data.dataset=digits", "--data.num_tasks=5", "--data.image_size=32", "--data.epochs_per_task=1",
    "--data.limit_per_class_train=8", "--data.limit_per_class_test=4", "--data.batch_size=16",
    "--trainer.accelerator=cpu", "--trainer.enable_model_summary=false",
]


def wandb_offline_run(run_dir: Path) -> tuple[dict, dict]:
    """The config and the run record (group, tags, name) of the offline W&B run in ``run_dir``.

    An offline run keeps them in its ``run-<id>.wandb`` file (W&B's record log: LevelDB's log format after a
    7-byte header, one protobuf ``Record`` per entry); ``wandb sync`` uploads exactly that.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, chunks, pending = path.read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        # A tail W&B's service is still writing is not a record yet (the likely cause of one CI failure under load).
        if pos + 7 + length > len(data):
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    config, run = {}, {}
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"group": record.run.run_group, "tags": list(record.run.tags), "name": record.run.display_name}
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        else:
            continue
        for item in items:
            config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return config, run


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
    assert sorted(results["class_order"]) == list(range(10)) and results["task_sizes"] == [2] * T
    errors = results["errors"]  # the last evaluation's wrong predictions: within a task or across tasks
    assert errors["wrong"] == pytest.approx(100.0 - results["last_accuracy"])
    assert errors["within_task"] + errors["other_task"] == pytest.approx(errors["wrong"])
    assert sum(n for *_, n in errors["confusions"]) == round(errors["wrong"] * errors["images"] / 100)
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

    # W&B and hparams.yaml hold the whole resolved config: HAM options, optimizer, data, trainer.
    config, record = wandb_offline_run(run)
    model = config["model"]
    assert model["ham"]["method"] == "ham" and model["ham"]["max_groups"] == 2 and model["ham"]["rank"] == 4
    assert model["optimizer"]["init_args"]["lr"] == 0.001 and config["data"]["dataset"] == "digits"
    assert config["trainer"]["accelerator"] == "cpu" and config["run"]["run_name"] == "tiny"
    assert record == {"group": "test", "tags": ["ham"], "name": "tiny"}
    import yaml

    (hparams,) = run.rglob("hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["model"]["ham"]["max_groups"] == 2 and logged["model"]["optimizer"]["init_args"]["lr"] == 0.001

    # The README's commands on this named run (its config.yaml says run_name: tiny): each writes beside the run.
    readme = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    # `test` re-evaluates every task: the accuracy matrix's last row, in percent as fit shows it, and a file.
    tested = cli(["test", *readme])
    metrics = tested.trainer.callback_metrics
    for j in range(T):
        # Per-task keys: HAMModule's own (test/acc_task_j) or Lightning's for a key logged per loader.
        value = metrics.get(f"test/acc_task_{j}", metrics.get(f"test/acc/dataloader_idx_{j}"))
        assert value is not None, sorted(metrics)
        assert 100 * float(value) == pytest.approx(final[j], abs=1e-4)
    written = json.loads((run / "test" / "test_results.json").read_text())
    assert written["accuracy_per_task"] == pytest.approx(final, abs=1e-4)
    assert written["accuracy_seen"] == pytest.approx(results["last_accuracy"], abs=1e-4)
    assert written["counts"] == [[round(final[j] * 8 / 100), 8] for j in range(T)]  # 2 classes x 4 images
    assert not (run / "test" / "results.json").exists() and (run / "results.json").is_file()

    # `predict` with the folded model: every test image, among the classes learned; it agrees with the matrix.
    import csv

    cli(["predict", *readme])
    with open(run / "predict" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["task", "index", "label", "label_name", "predicted", "predicted_name", "probability"]
    assert len(rows) == 5 * 2 * 4  # tasks x classes x limit_per_class_test
    correct = sum(int(r["predicted"]) == int(r["label"]) for r in rows)
    assert 100 * correct / len(rows) == pytest.approx(results["last_accuracy"], abs=1e-4)
    names = tested.datamodule.class_names  # the data set's own names beside the permuted indices
    assert all(r["label_name"] == str(names[int(r["label"])]) and r["predicted_name"] == str(names[int(r["predicted"])])
               for r in rows)
    assert any(r["label_name"] != r["label"] for r in rows)  # digits' classes are permuted: names differ from indices
    cli(["predict", *readme])  # again: a second folder, the first kept
    assert (run / "predict-2" / "predictions.csv").is_file() and (run / "predict" / "predictions.csv").is_file()
    # The checkpoint copied out of the run, with the run's config (which names the taken folder runs/tiny).
    import shutil

    shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "copy.ckpt")
    cli(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(tmp_path / "copy.ckpt")])
    assert (tmp_path / "runs" / "tiny-test" / "test_results.json").is_file()
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (20, 20), (30 * k, 200, 90)).save(images / f"{k}.png")
    cli(["predict", *TINY, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"--predict_path={images.parent}",
         "--run_name=tiny-folder", f"--runs_dir={tmp_path / 'runs'}"])  # another name: a folder of its own
    with open(tmp_path / "runs" / "tiny-folder" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == ["0.png", "1.png", "2.png"]
    assert all(0 <= int(r["predicted"]) < 10 and 0 < float(r["probability"]) <= 1 for r in rows)


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


def _printed_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    import yaml

    with pytest.raises(SystemExit):
        cli(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_quick_start_settings_reach_only_the_quick_start(capsys: pytest.CaptureFixture[str]) -> None:
    quick = _printed_config([], capsys)
    assert quick["data"]["image_size"] == 64 and quick["model"]["head"] == "ridge"
    assert quick["benchmark"] == "quickstart"
    vit = _printed_config(["--config", str(CONFIGS[0].parent / "cifar100_10_vit_b16.yaml")], capsys)
    assert vit["data"]["image_size"] is None  # from the backbone's data config: 224 for ViT-B/16
    assert vit["model"]["head"] == "linear" and vit["benchmark"] == "cifar100_10_vit_b16"


def test_every_logger_writes_into_the_run_folder(tmp_path: Path) -> None:
    """TensorBoard (which requires save_dir) as for W&B and CSV: the CLI fills it with the run folder."""
    pytest.importorskip("tensorboard")
    cli(["fit", *TINY, "--data.num_tasks=1", "--data.limit_per_class_train=2", "--trainer.logger=TensorBoardLogger",
         "--run_name=tb", f"--runs_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false"])
    assert list((tmp_path / "runs" / "tb").rglob("events.out.tfevents.*"))


def test_help_is_short_and_describes_ham_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # in-process: the same parser, no interpreter start
        cli(["fit", "--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    # HAMConfig's field metadata (compared without the help formatter's line breaks).
    assert "max_groups:Numberofpre-allocatedgroupslotsG_max" in "".join(out.split())
    assert "torch.nn.modules" not in out  # --model.backbone does not list every nn.Module
    assert len(out.splitlines()) < 1000  # was 2,314 lines; most of what is left is Lightning's Trainer


def test_import_ham_lightning_loads_no_optional_heavy_packages() -> None:
    code = ("import sys, ham_lightning; "
            "print(sorted(m for m in ('wandb', 'matplotlib', 'sklearn', 'peft', 'lightning', 'timm') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert out.strip() == "[]"

"""benchmarks/compare.py on a tiny fixture scenario: two methods, two tasks; JSON, table, plots, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark, offline_wandb

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--model.backbone=vit_tiny_patch16_224", "--model.pretrained=false",
    '--model.backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}',
    "--model.ham.target_modules=[qkv, fc1, fc2]", "--model.ham.max_groups=2", "--model.ham.rank=4",
    "--model.ham.adapt_from=null", "--data.prefix_cache=null",  # the quick start caches a prefix to blocks.6
    # The quick start's ridge head, 256 wide: at 2048 its float64 eigendecompositions were most of a tiny run's time.
    '--model.head_kwargs={"projection": 256}',
    "--data.dataset=digits", "--data.image_size=32", "--data.epochs_per_task=1",
    "--data.limit_per_class_train=8", "--data.limit_per_class_test=4", "--data.batch_size=16",
    "--trainer.accelerator=cpu", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline_wandb(monkeypatch, tmp_path)


def test_compare_two_methods_two_tasks_writes_json_table_and_resumes(tmp_path: Path) -> None:
    compare = load_benchmark("compare")
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--methods", "ham", "merge_average", "--num_tasks", "2", "--out", str(out), "--runs_dir", str(runs),
            "--", *TINY]
    result = compare.main(argv)
    data = json.loads((out / "compare.json").read_text())
    assert data == json.loads(json.dumps(result))
    rows = data["runs"]["2"]
    assert [r["method"] for r in rows] == ["ham", "merge_average"]
    for r in rows:
        assert 0 <= r["last_accuracy"] <= 100 and len(r["incremental_accuracy"]) == 2
        assert r["forgetting"] is not None and r["bwt"] is not None
        assert r["trainable_params"] > 0 and r["stored_params"] > 0 and r["wall_time_s"] > 0
        wrong = 100.0 - r["last_accuracy"]  # every wrong prediction is within its task or into another one
        split = r["errors_within_task"] + r["errors_to_later_task"] + r["errors_to_earlier_task"]
        assert split == pytest.approx(wrong, abs=1e-6)
    per_method = json.loads((out / "T2" / "merge_average.json").read_text())
    assert per_method["config"]["model"]["ham"]["method"] == "merge_average"
    assert per_method["config"]["model"]["ham"]["max_groups"] == 1
    assert len(per_method["accuracy_matrix"]) == 2
    table = (out / "compare.md").read_text()
    assert "| method | last acc |" in table and "| ham |" in table and "| merge_average |" in table
    assert "| err. within task | err. to later / earlier task |" in table
    assert (out / "accuracy_after_each_task.png").exists()
    assert list((runs / "T2" / "ham" / "wandb").glob("offline-run-*"))  # each run logged to W&B offline

    # Resume: both methods are done, so nothing runs again and the table is the same.
    stamp = (out / "T2" / "ham.json").stat().st_mtime_ns
    compare.main(argv)
    assert (out / "T2" / "ham.json").stat().st_mtime_ns == stamp
    assert (out / "compare.md").read_text() == table


def test_method_args_are_known() -> None:
    compare = load_benchmark("compare")
    assert compare.method_args("ham") == []
    assert "--data.num_tasks=1" in compare.method_args("joint")
    with pytest.raises(ValueError):
        compare.method_args("nope")


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_method_is_a_valid_setting_of_every_shipped_config(config: str) -> None:
    """Each method's ``--model.ham.*`` overrides on top of a shipped config are accepted (as the CLI reads a value):
    a config that routes with ``protect_scope: group`` must still give valid unrouted baselines."""
    import yaml

    from ham_lightning.core.config import HAMConfig

    compare = load_benchmark("compare")
    model = yaml.safe_load((ROOT / "configs" / config).read_text()).get("model", {})
    for method in compare.METHODS:
        ham = dict(model.get("ham") or {})
        ham.update({o.split("=", 1)[0].removeprefix("--model.ham."): yaml.safe_load(o.split("=", 1)[1])
                    for o in compare.method_args(method) if o.startswith("--model.ham.")})
        try:
            HAMConfig(**ham)
        except (TypeError, ValueError) as err:
            raise AssertionError(f"{config}, method {method}: {ham} is refused: {err}") from err
        top = {**model, **{o.split("=", 1)[0].removeprefix("--model."): yaml.safe_load(o.split("=", 1)[1])
                           for o in compare.method_args(method) if o.startswith("--model.") and ".ham." not in o}}
        if top.get("route_head") and top.get("adapt", True):  # HAMModule refuses it on adapters that do not route
            assert ham.get("routing"), f"{config}, method {method}: route_head without routing"

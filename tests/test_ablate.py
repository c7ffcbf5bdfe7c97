"""benchmarks/ablate.py: a variant that fails (an exception, or the CLI parser's SystemExit) is named, the others
run, and the table is still written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark, offline_wandb

ROOT = Path(__file__).resolve().parents[1]


def test_a_failing_variant_is_named_and_the_table_still_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    offline_wandb(monkeypatch, tmp_path)
    load_benchmark("compare")
    ablate = load_benchmark("ablate")
    real_run_method = ablate.run_method

    def run_method(method, num_tasks, config, args, runs_dir, group):
        if any("protect_inputs=null" in a for a in args):  # the real CLI: its parser exits (status 2)
            return real_run_method(method, num_tasks, config, args, runs_dir, group=group)
        if method == "ncm":
            raise RuntimeError("out of memory")
        return {"method": method, "last_accuracy": 50.0, "average_incremental_accuracy": 60.0, "forgetting": 5.0,
                "bwt": -5.0, "fit_wall_time_s": 10.0, "params": {}}

    monkeypatch.setattr(ablate, "run_method", run_method)
    monkeypatch.setitem(ablate.ABLATIONS, "null_protect", ("ham", ["--model.ham.protect_inputs=null"]))
    out = tmp_path / "ablations"
    ablate.ablate(["null_protect", "ncm_frozen", "default"], None, 2, out, None, runs_dir=tmp_path / "runs")
    table = (out / "ablations.md").read_text()
    assert "| default | 50.00 | 60.00 | 5.00 | 10 |" in table
    assert "| null_protect | failed |" in table and "| ncm_frozen | failed |" in table
    failed = json.loads((out / "ablations.json").read_text())["failed"]
    assert failed["null_protect"] == "SystemExit: 2" and failed["ncm_frozen"] == "RuntimeError: out of memory"
    assert "[ablate] failed: null_protect" in capsys.readouterr().out


def test_every_variant_override_is_accepted_by_the_cli() -> None:
    """The shipped variants' ``--model.ham.*`` overrides are valid settings, read as the CLI reads a value (YAML):
    protect_off once passed null, which the CLI refused."""
    import yaml

    from ham_lightning.core.config import HAMConfig

    ablate = load_benchmark("ablate")
    # On top of the config ablate.py runs by default (its --config), as the CLI applies them.
    default = yaml.safe_load((ROOT / "configs" / "tiny_imagenet_lite0_cpu.yaml").read_text())["model"]["ham"]
    for variant, (_, overrides) in ablate.ABLATIONS.items():
        ham = dict(default)
        ham.update({o.split("=", 1)[0].removeprefix("--model.ham."):
                    yaml.safe_load(o.split("=", 1)[1].replace("{T}", "10"))
                    for o in overrides if o.startswith("--model.ham.")})
        try:
            HAMConfig(**ham)
        except (TypeError, ValueError) as err:
            raise AssertionError(f"variant {variant}: {ham} is refused: {err}") from err

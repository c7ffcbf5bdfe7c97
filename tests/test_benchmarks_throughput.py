"""The throughput benchmark runs end to end on its smallest configuration and reports sane ratios."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    return _load()


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_smoke_run_writes_json_and_markdown(throughput: ModuleType, tmp_path: Path) -> None:
    results = throughput.run(throughput.smoke_config(extra_batches=[2]), out_dir=tmp_path, command="smoke")
    on_disk = json.loads((tmp_path / "throughput_cpu.json").read_text())
    assert (tmp_path / "throughput_cpu.md").read_text() == results["markdown"]
    assert set(on_disk) >= {"meta", "ceiling", "train", "infer", "merge", "memory", "headline", "markdown"}
    train_variants = {"bare", "single", "ham", "ham_cap", "ham_cap_trained_c", "peft", "single_twin"}
    assert set(on_disk["train"]) == train_variants
    assert set(on_disk["train_extra_batches"]["2"]["rows"]) == train_variants
    assert set(on_disk["infer"]) == {"bare", "ham_folded", "ham_unfolded", "peft_unmerged", "bare_twin"}
    for row in on_disk["train"].values():
        for key in ("ms", "img_per_s", "ratio_vs_single", "ratio_vs_peft", "ratio_vs_bare", "gflop_per_img"):
            assert _positive(row[key]), (key, row)
    for row in on_disk["infer"].values():
        assert _positive(row["ratio_vs_bare"]) and _positive(row["img_per_s"])
    assert on_disk["train"]["single"]["ratio_vs_single"] == 1.0
    assert on_disk["group_rank_used"]["ham_cap"] == 4  # smoke: group_rank 4, every slot filled to its cap
    merge = on_disk["merge"]
    assert set(merge["by_kind"]) == {"open", "join_concat", "join_svd"}
    assert all(_positive(v["ms_median"]) for v in merge["by_kind"].values())
    rows = on_disk["memory"]["rows"]
    assert [r["tasks"] for r in rows] == [2, 4]
    assert rows[0]["stored_adapter_bytes"] == rows[1]["stored_adapter_bytes"] > 0  # flat once the slots are full
    for item in on_disk["headline"].values():
        assert _positive(item["value"]), item
    ratios = ("ham_vs_single_step_ratio", "ham_vs_peft_step_ratio", "folded_vs_bare_inference_ratio",
              "unfolded_vs_bare_inference_ratio", "merge_seconds", "stored_bytes_T100_vs_T10",
              "peak_memory_T100_vs_T10")
    for key in ratios:  # issue 12's keys, flat at the top level
        assert _positive(on_disk[key]), key
    assert on_disk["ham_vs_single_step_ratio"] == on_disk["train"]["ham_cap"]["ratio_vs_single"]
    assert on_disk["stored_bytes_T100_vs_T10"] == 1.0 and on_disk["memory_tasks_compared"] == [2, 4]
    assert on_disk["command"] == "smoke" and on_disk["versions"]["torch"] and on_disk["machine"]["cpu_count"]
    paths = on_disk["paths"]["rows"]
    assert [(r["kind"], r["in"], r["out"]) for r in paths] == [("linear", 48, 96), ("conv", 8, 16)]
    for r in paths:
        assert set(r["ms"]) == {"auto", "lowrank", "merged", "merged_dense"} and all(map(_positive, r["ms"].values()))
        assert r["auto_chose"] == min(r["model_costs"], key=r["model_costs"].get)
        assert r["k"] == 2 * 4  # smoke: 2 slots at rank cap 4


def test_cli_overrides_and_gpu_preset(throughput: ModuleType) -> None:
    cfg, _ = throughput.parse_args(["--device", "cuda", "--compile", "--batch", "64"])
    assert (cfg.model, cfg.img_size, cfg.amp, cfg.batch, cfg.compile, cfg.top_blocks) == (
        "vit_base_patch16_224", 224, "bf16", 64, True, None)
    cfg, _ = throughput.parse_args([])
    assert cfg.device == "cpu" and cfg.top_blocks == 4 and cfg.max_groups == 8

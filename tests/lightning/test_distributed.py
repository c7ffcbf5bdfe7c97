"""DDP on CPU processes (gloo): every rank ends a task with the state one process would have, and the ranks agree.

The runs are `ddp_sequence.py` in subprocesses: launched by Lightning (``devices=2``) or from outside with
``RANK`` / ``WORLD_SIZE`` set (as torchrun and SLURM do); the one-process reference runs here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_sequence import run

SCRIPT = Path(__file__).with_name("ddp_sequence.py")


def _env(**extra: str) -> dict[str, str]:
    paths = [str(Path(__file__).parents[1]), str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, *args: str, outside: bool = False) -> None:
    """Two ranks of ``ddp_sequence.py OUT args``: Lightning starts rank 1, or both are started here."""
    command = [sys.executable, str(SCRIPT), str(out), *args]
    if not outside:
        proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    port = str(_free_port())
    procs = [subprocess.Popen(command, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", NODE_RANK="0",
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]


def _ranks(out: Path, head: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{head}_rank{r}.pt") for r in range(2)]


def _assert_ranks_identical(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["tasks"] == ranks[1]["tasks"] == 2
    assert ranks[0]["rows"] == ranks[1]["rows"]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    differ = [k for k, v in ranks[0]["state"].items() if not torch.equal(v, ranks[1]["state"][k])]
    assert not differ, differ


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_ddp_two_processes_end_with_identical_slots(tmp_path: Path) -> None:
    _launch(tmp_path)
    ranks = _ranks(tmp_path, "linear")
    _assert_ranks_identical(ranks)
    assert sum(n for _, n in ranks[0]["rows"][-1]) == 2 * 2 * 24  # every test sample counted once over ranks
    assert any(v.abs().sum() > 0 for k, v in ranks[0]["state"].items() if "group_B" in k)


def test_frozen_statistics_heads_under_ddp_equal_one_process(tmp_path: Path) -> None:
    """ridge, ncm and aligned on a frozen backbone: 2 ranks (each forwards half of every batch) fit the head one
    process fits, to 1e-5 relative, with the same accuracy matrix."""
    heads = ["ridge", "ncm", "aligned"]
    _launch(tmp_path, "--head", ",".join(heads), "--adapt", "0", outside=True)
    for head in heads:
        ranks = _ranks(tmp_path, head)
        _assert_ranks_identical(ranks)
        single = run(head, adapt=False, devices=1)
        assert abs(ranks[0]["last"] - single["last"]) <= 0.1, head
        assert ranks[0]["rows"] == single["rows"], head
        head_state = {k: v for k, v in single["state"].items() if k.startswith("head.")}
        assert head_state, single["state"].keys()
        for key, value in head_state.items():
            if value.is_floating_point():
                assert _relative(ranks[0]["state"][key], value) <= 1e-5, (head, key)
            else:
                assert torch.equal(ranks[0]["state"][key], value), (head, key)


def test_ham_with_protection_routing_and_ridge_head_under_ddp(tmp_path: Path) -> None:
    """Input moments, router sums and head statistics are summed over the ranks: every rank ends each task with
    identical adapters, slots, projectors, router and head, and the counts are those of the whole data."""
    _launch(tmp_path, "--head", "ridge", "--protect", "0.9", "--routing", "1")
    ranks = _ranks(tmp_path, "ridge")
    _assert_ranks_identical(ranks)
    single = run("ridge", adapt=True, protect=0.9, routing=True, devices=1)
    state, reference = ranks[0]["state"], single["state"]
    for key in [k for k in reference if k.endswith(("router.slot_count", "router.scatter_count", "head.count"))]:
        assert torch.equal(state[key], reference[key]), key  # every training sample counted once
    assert torch.equal(state["head.batches"], reference["head.batches"])  # the same batches as one process
    # fc1's inputs are the data themselves: its moment sums every sample once, as in one process (fc2's inputs
    # went through adapters that trained on other batches: 2 ranks x 16 samples a step).
    first = "backbone.blocks.0.fc1.ham_state.subspace.moment__blocks__0__fc1"
    assert _relative(state[first], reference[first]) < 1e-6
    assert ranks[0]["last"] == pytest.approx(single["last"], abs=5.0)


def test_a_head_per_group_and_adapters_from_inputs_under_ddp(tmp_path: Path) -> None:
    """``route_head``: every rank tells its group heads the task's slot and feeds them whole batches, so the ranks
    end identical and each group's head counts its tasks' samples once, as one process does. With
    ``adapter_init="inputs"`` (the mixed-domain config's settings) each rank passes its share of the task's inputs
    and the moments are summed: an ``A`` computed from one rank's share alone would differ between the ranks."""
    _launch(tmp_path, "--head", "ridge", "--protect", "0.9", "--routing", "1", "--route_head", "1",
            "--adapter_init", "inputs")
    ranks = _ranks(tmp_path, "ridge")
    _assert_ranks_identical(ranks)
    single = run("ridge", adapt=True, protect=0.9, routing=True, devices=1, route_head=True, adapter_init="inputs")
    state, reference = ranks[0]["state"], single["state"]
    keys = [k for k in reference if k.startswith("head.heads.") and k.endswith((".count", ".batches"))]
    assert keys and torch.equal(state["head.class_slot"], reference["head.class_slot"])
    for key in keys:
        assert torch.equal(state[key], reference[key]), key
    assert sum(int(reference[k]) for k in keys if k.endswith(".count")) > 0

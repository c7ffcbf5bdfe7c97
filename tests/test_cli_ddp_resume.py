"""A 2-process DDP ``ham-lightning fit`` killed mid-task resumes to the state of an uninterrupted 2-process run.

Real commands on 2 CPU processes (gloo, launched by Lightning): the run is SIGKILLed, with every rank, in the
second epoch of task 1 (so ``last.ckpt`` is mid-task), resumed with the README's command, and compared bit for bit
with an uninterrupted 2-process run: state dict (adapters, slots, projectors, moments, ridge head) and accuracy
matrix.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from test_cli_resume import _assert_same_run, _output, _pause, _resume_args, _start, _write_config

DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--model.head=ridge",
       '--model.head_kwargs={"projection": 64}', "--model.ham.protect_inputs=0.9"]


def _finish(process: object) -> None:
    status = process.wait(timeout=600)  # type: ignore[attr-defined]
    assert status == 0, _output(process)[-3000:]  # type: ignore[arg-type]


def test_ddp_run_killed_mid_task_resumes_as_the_uninterrupted_ddp_run(tmp_path: Path) -> None:
    config = _write_config(tmp_path, "ham")
    run = tmp_path / "runs" / "killed"
    flag = tmp_path / "kill"
    # 3 tasks x 2 epochs; the pause is at the first batch of epoch 3 (task 1's second epoch): last.ckpt = epoch 2.
    process = _start(tmp_path, ["--config", str(config), "--run_name=killed", *DDP, _pause(flag, epoch=3)])
    ready, deadline = Path(str(flag) + ".ready"), time.monotonic() + 600
    while not ready.exists():
        assert process.poll() is None, _output(process)[-3000:]
        assert time.monotonic() < deadline, "the run never reached its pause point"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # every rank: Lightning's launcher starts rank 1 in this session
    process.wait(timeout=60)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and not (run / "results.json").exists()

    resumed = _start(tmp_path, _resume_args(run, ["--trainer.callbacks=[]"]))
    reference = _start(tmp_path, ["--config", str(config), "--run_name=reference", *DDP])
    _finish(resumed)
    _finish(reference)
    _assert_same_run(run, tmp_path / "runs" / "reference")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")

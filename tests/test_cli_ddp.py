"""``ham-lightning fit`` under DDP: the real command on 2 CPU processes (gloo), and which rank owns the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import offline_wandb
from test_cli import TINY

from ham_lightning.cli import LOCK_NAME, cli
from ham_lightning.cli.distributed import RUN_DIR_ENV, launch_rank, run_folder_for

ROOT = Path(__file__).resolve().parents[1]
RANK_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", RUN_DIR_ENV)


def _fresh_env() -> dict[str, str]:
    """The environment of a command a user starts: no launcher's rank, and no W&B folder that an earlier in-process
    command of this test session pointed at its own run (`ham_lightning.cli.tool_dirs`)."""
    skip = {*RANK_KEYS, "WANDB_API_KEY", "WANDB_DATA_DIR", "WANDB_CACHE_DIR"}
    return {k: v for k, v in os.environ.items() if k not in skip}


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline_wandb(monkeypatch, tmp_path)
    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)


def test_the_command_runs_to_the_end_on_two_ddp_processes(tmp_path: Path) -> None:
    """The second rank is relaunched by Lightning with ``sys.argv``: it must get the whole command (quick start's
    --config included) and rank 0's run folder; one folder, rank 0's files, the whole accuracy matrix."""
    env = _fresh_env()
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), WANDB_MODE="offline",
               WANDB_SILENT="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = [*TINY, "--data.num_tasks=2", "--trainer.devices=2", "--trainer.strategy=ddp",
            "--trainer.enable_progress_bar=false", f"--runs_dir={tmp_path / 'runs'}"]  # no --run_name: a dated one
    done = subprocess.run([sys.executable, "-m", "ham_lightning.cli", "fit", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 1, [sorted(p.name for p in f.rglob("*")) for f in folders]  # rank 1 made none of its own
    run = folders[0]
    results = json.loads((run / "results.json").read_text())
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[1][0] is not None and matrix[1][1] is not None
    errors = results["errors"]  # counted on both ranks' shares and summed: every test image once (10 classes x 4)
    assert errors["images"] == 40 and errors["wrong"] == pytest.approx(100.0 - results["last_accuracy"])
    assert results["run"]["run_dir"] == str(run)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / LOCK_NAME).exists() and not list(run.glob("checkpoints/.*.tmp-*"))
    output = done.stdout + done.stderr
    assert output.count("task 2/2 done") == 1 and output.count("Results: ") == 1  # printed by rank 0 alone


def test_launch_rank_reads_the_launchers_environment() -> None:
    assert launch_rank({}) == 0
    assert launch_rank({"RANK": "3", "LOCAL_RANK": "1"}) == 3  # torchrun
    assert launch_rank({"LOCAL_RANK": "1", "SLURM_PROCID": "0"}) == 1  # Lightning's child inside an sbatch job
    assert launch_rank({"LOCAL_RANK": "0", "NODE_RANK": "1"}) == 1
    assert launch_rank({"LOCAL_RANK": "0", "NODE_RANK": "0", "SLURM_PROCID": "0"}) == 0
    assert launch_rank({"SLURM_PROCID": "2"}) == 2  # srun


def test_other_ranks_use_rank_zeros_folder_without_touching_it(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = {"run_name": None, "runs_dir": str(tmp_path / "runs")}
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "runs" / "published"))
    folder = run_folder_for("fit", config, "b", None, None, None)
    assert folder.path == tmp_path / "runs" / "published"
    monkeypatch.delenv(RUN_DIR_ENV)
    folder = run_folder_for("fit", {**config, "run_name": "shared"}, "b", None, None, None)
    assert folder.path == tmp_path / "runs" / "shared"
    assert not (tmp_path / "runs").exists()  # nothing created, nothing locked
    resumed = tmp_path / "runs" / "old"
    assert run_folder_for("fit", config, "b", resumed, resumed, None).path == resumed


def test_another_rank_of_an_external_launcher_needs_a_run_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANK", "1")  # torchrun's second process
    with pytest.raises(SystemExit) as exit_:
        cli(["fit", *TINY, f"--runs_dir={tmp_path / 'runs'}"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rank 1" in last and "--run_name NAME" in last
    assert not (tmp_path / "runs").exists()


def test_frozen_ridge_head_on_two_ddp_processes_equals_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """``--model.adapt=false --model.head=ridge`` (nothing to train: the model stays unwrapped) on 2 processes:
    the statistics pass gathers whole batches, so the head and the accuracy are one process's."""
    import torch

    env = _fresh_env()
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), WANDB_MODE="offline",
               WANDB_SILENT="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = [*TINY, "--data.num_tasks=2", "--model.adapt=false", "--model.head=ridge",
            '--model.head_kwargs={"projection": 64}', "--trainer.enable_progress_bar=false",
            f"--runs_dir={tmp_path / 'runs'}"]
    done = subprocess.run([sys.executable, "-m", "ham_lightning.cli", "fit", *args, "--run_name=ddp",
                           "--trainer.devices=2", "--trainer.strategy=ddp"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli(["fit", *args, "--run_name=single"])
    finally:
        torch.set_num_threads(threads)
    runs = {name: tmp_path / "runs" / name for name in ("ddp", "single")}
    results = {n: json.loads((r / "results.json").read_text()) for n, r in runs.items()}
    assert abs(results["ddp"]["last_accuracy"] - results["single"]["last_accuracy"]) <= 0.1
    states = {n: torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for n, r in runs.items()}
    head = [k for k in states["single"] if k.startswith("head.")]
    assert "head.gram" in head
    for key in head:
        a, b = states["ddp"][key], states["single"][key]
        if a.is_floating_point():
            assert float((a.double() - b.double()).norm()) <= 1e-5 * float(b.double().norm()) + 1e-12, key
        else:
            assert torch.equal(a, b), key

"""Run folders and settings: runs never clobber each other, a resume cannot change a run's settings, and bad
settings are refused before anything is built, with the fix on the last line."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import offline_wandb
from test_cli import TINY
from test_cli_resume import (  # noqa: F401 (one_thread: a fixture)
    _assert_same_run,
    _kill_when_paused,
    _pause,
    _resume_args,
    _start,
    _write_config,
    one_thread,
)

import ham_lightning.cli as ham_cli
from ham_lightning.cli import cli


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline_wandb(monkeypatch, tmp_path)


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the model's backbone fails the test: the error must come before it."""
    import ham_lightning.core.backbones

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the bad setting was refused")

    monkeypatch.setattr(ham_lightning.core.backbones, "create_backbone", refuse)


def _last_line(err: str) -> str:
    return [line for line in err.strip().splitlines() if line.strip()][-1]


@pytest.mark.parametrize(("option", "expected"), [
    ("--model.ham.max_groups=0", "max_groups must be >= 1, got 0"),
    ("--model.ham.density=1.5", "density must be in (0, 1], got 1.5"),
    ("--model.ham.rank=0", "rank must be >= 1, got 0"),
])
def test_invalid_ham_config_is_refused_before_building_with_the_fix_last(
        option: str, expected: str, nothing_built: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", *TINY, option])
    assert exit_info.value.code == 2
    last = _last_line(capsys.readouterr().err)
    assert expected in last and "--model.ham" in last
    assert not Path("runs").exists()


def test_two_epochs_per_task_settings_are_refused(nothing_built: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["fit", *TINY, "--data.epochs_per_task=2", "--merge.epochs_per_task=3"])
    last = _last_line(capsys.readouterr().err)
    assert "--merge.epochs_per_task 3" in last and "--data.epochs_per_task 2" in last
    # The same value twice is one schedule.
    assert ham_cli.resolve_epochs_per_task(3, 3) == 3 and ham_cli.resolve_epochs_per_task(None, 2) == 2


def test_max_epochs_that_cut_the_sequence_short_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["fit", *TINY, "--trainer.max_epochs=3"])  # 5 tasks x 1 epoch
    assert "ends the sequence before its last task" in _last_line(capsys.readouterr().err)


def test_a_missing_data_root_is_refused_before_the_model_is_built(tmp_path: Path, nothing_built: None) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match="tiny-imagenet-200"):
        cli(["fit", *TINY, "--data.dataset=tiny_imagenet", f"--data.root={tmp_path / 'missing'}",
             "--data.num_tasks=10", "--data.limit_per_class_train=null", "--data.limit_per_class_test=null"])


def test_a_run_never_writes_into_another_runs_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Run A (a subprocess) pauses in its first epoch, holding runs/same.
    config = _write_config(tmp_path, "ham")
    flag = tmp_path / "a"
    process = _start(tmp_path, ["--config", str(config), "--run_name=same", _pause(flag, epoch=0)])
    ready = Path(f"{flag}.ready")
    while not ready.exists():
        assert process.poll() is None, "run A ended before pausing"
        time.sleep(0.05)
    # Run B, same name, while A runs: refused, naming the folder; it writes nothing there.
    before = sorted(p.name for p in (tmp_path / "runs" / "same").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", *TINY, "--run_name=same"])
    assert exit_info.value.code == 2
    err = _last_line(capsys.readouterr().err)
    assert "runs/same" in err and ("in use by another run" in err or "already holds a run" in err)
    assert sorted(p.name for p in (tmp_path / "runs" / "same").iterdir()) == before
    Path(f"{flag}.go").write_text("")
    assert process.wait(timeout=600) == 0
    results = json.loads((tmp_path / "runs" / "same" / "results.json").read_text())
    assert results["config"]["data"]["num_tasks"] == 3  # A's results, config and checkpoint, whole
    assert results["run"]["run_name"] == "same"

    # Once A is done, a new run of that name is refused too: resuming is the one way to continue a folder.
    with pytest.raises(SystemExit):
        cli(["fit", *TINY, "--run_name=same"])
    err = _last_line(capsys.readouterr().err)
    assert "already holds a run" in err and "--ckpt_path" in err


def test_a_run_that_died_before_its_first_checkpoint_restarts_with_the_same_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ham_lightning.data import ClassIncrementalDataModule

    def interrupted(self, stage=None):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) while the data is set up, e.g. the prefix cache is built

    command = ["fit", *TINY, "--run_name=early", "--trainer.enable_progress_bar=false"]
    with monkeypatch.context() as patch:
        patch.setattr(ClassIncrementalDataModule, "setup", interrupted)
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            cli(command)
    run = tmp_path / "runs" / "early"
    assert ham_cli.never_started(run) and not (run / "checkpoints" / "last.ckpt").exists()
    left = sorted(p.name for p in run.iterdir())
    assert left and set(left) <= {"csv", "wandb", "config.yaml", "checkpoints", ".ham-lightning.lock"}
    capsys.readouterr()

    # The README's resume command says there is nothing to resume and what to run instead.
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert exit_info.value.code == 2
    err = _last_line(capsys.readouterr().err)
    assert "stopped before its first checkpoint" in err and "same --run_name" in err

    # The same command and name start it again in that folder, and it finishes.
    cli(command)
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert (run / "results.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not ham_cli.never_started(run)
    with pytest.raises(SystemExit):  # now it holds a run: refused, as any finished run's folder
        cli(command)
    assert "already holds a run" in _last_line(capsys.readouterr().err)


def test_rerunning_a_saved_config_starts_a_new_folder(tmp_path: Path) -> None:
    cli(["fit", *TINY, "--trainer.enable_progress_bar=false", "--benchmark=b", "--data.num_tasks=2",
         "--trainer.logger=false"])  # run folders are under test, not the loggers (test_cli covers them)
    (first,) = (tmp_path / "runs").iterdir()
    assert first.name.startswith("b-") and "run_name: null" in (first / "config.yaml").read_text()
    cli(["fit", "--config", str(first / "config.yaml")])
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all((tmp_path / "runs" / f / "results.json").is_file() for f in folders)


def test_automatic_run_names_never_collide(tmp_path: Path) -> None:
    first = ham_cli.claim_new_run(tmp_path, None, "bench-20250101-000000")
    (first.path / "results.json").write_text("{}")
    second = ham_cli.claim_new_run(tmp_path, None, "bench-20250101-000000")
    assert first.path.name == "bench-20250101-000000" and second.path.name == "bench-20250101-000000-2"
    with pytest.raises(ham_cli.RunFolderError, match="in use by another run"):
        ham_cli.claim_new_run(tmp_path, "bench-20250101-000000-2", "x")  # held by `second`
    second.release()
    first.release()


def test_a_resume_that_contradicts_the_checkpoint_is_refused_naming_the_setting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli(["fit", *TINY, "--run_name=r", "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        cli(["fit", *TINY, "--model.ham.max_groups=1", "--data.batch_size=8", f"--ckpt_path={ckpt}"])
    err = _last_line(capsys.readouterr().err)
    assert "model.ham.max_groups: checkpoint 2, this command 1" in err
    assert "data.batch_size: checkpoint 16, this command 8" in err
    # Settings that do not change the results may differ.
    saved = torch.load(ckpt, weights_only=True)[ham_cli.CHECKPOINT_KEY]["config"]
    assert ham_cli.contradictions(saved, {**saved, "data": {**saved["data"], "num_workers": 3}}) == []


@pytest.mark.usefixtures("one_thread")
def test_sigterm_in_the_first_epoch_exits_non_zero_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    config = _write_config(tmp_path, "ham")
    flag = tmp_path / "t"
    status, output = _kill_when_paused(tmp_path, ["--config", str(config), "--run_name=early",
                                                  _pause(flag, epoch=0)], flag, signal.SIGTERM)
    # Lightning stops after the batch it is in; the checkpoint written when training started is there to resume
    # from (the subprocess tests resume from such files bit for bit after later kills).
    assert status == 143, output[-2000:]
    assert "at the start of training" in output and "Resume with" in output
    ckpt = torch.load(tmp_path / "runs" / "early" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt[ham_cli.CHECKPOINT_KEY]["saved_at"] == "start"
    run = tmp_path / "runs" / "early"
    cli(["fit", *_resume_args(run)])
    cli(["fit", "--config", str(config), "--run_name=reference"])
    _assert_same_run(run, tmp_path / "runs" / "reference")


def test_wandb_and_matplotlib_are_pointed_at_the_run_folder_and_the_project_cache_unless_the_user_chose(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ham_lightning.cli import tool_dirs

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "MPLCONFIGDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tool_dirs, "_SET_HERE", {})
    cache = tmp_path / "home" / ".cache" / "ham_lightning"
    assert tool_dirs.point_wandb(tmp_path / "runs" / "a") == {
        "WANDB_DATA_DIR": str(tmp_path / "runs" / "a" / "wandb" / "data"), "WANDB_CACHE_DIR": str(cache / "wandb")}
    assert tool_dirs.point_matplotlib() == {"MPLCONFIGDIR": str(cache / "matplotlib")}
    # The next run in the same process gets its own folder; a value the user set is kept.
    monkeypatch.setenv("WANDB_CACHE_DIR", "/mine")
    assert tool_dirs.point_wandb(tmp_path / "runs" / "b") == {
        "WANDB_DATA_DIR": str(tmp_path / "runs" / "b" / "wandb" / "data")}
    assert os.environ["WANDB_CACHE_DIR"] == "/mine"

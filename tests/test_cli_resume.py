"""A killed ``ham-lightning fit`` resumes where it stopped and ends bit for bit as an uninterrupted run.

Real subprocesses of the ``ham-lightning`` command get SIGINT, SIGTERM or SIGKILL mid-task (mid-epoch) and at a
task boundary, and are resumed with the README's command (``--config <run>/config.yaml --ckpt_path
<run>/checkpoints/last.ckpt``). The signal is sent from outside while the run waits in `PauseAt` (a callback
given on the command line), so the point of the kill is exact and the test does not race the training.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

TESTS = Path(__file__).resolve().parent

#: Two epochs per task (so a checkpoint falls mid-task), two batches per epoch (so a kill falls mid-epoch), three
#: tasks on two group slots (so the last task merges into an occupied slot).
TINY_CONFIG = {
    "seed_everything": 1993,
    "model": {
        "backbone": "vit_tiny_patch16_224", "pretrained": False,
        "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
        "head": "cosine", "head_lr": 0.01,
        "ham": {"target_modules": ["qkv", "fc1", "fc2"], "max_groups": 2, "rank": 4},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.0}},
        "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1,
                                                                                       "gamma": 0.5}},
    },
    "data": {"dataset": "digits", "num_tasks": 3, "image_size": 32, "epochs_per_task": 2, "batch_size": 16,
             "limit_per_class_train": 8, "limit_per_class_test": 4},
    "trainer": {"accelerator": "cpu", "enable_model_summary": False, "enable_progress_bar": False,
                "logger": False},
}
BASELINE = {"max_groups": 1, "train_importance": False, "train_group_scalars": False}


class PauseAt(Callback):
    """Waits at one point of training until ``<flag>.go`` exists, after writing ``<flag>.ready``.

    ``hook="batch"``: at the start of batch ``batch`` of epoch ``epoch``; ``hook="epoch_end"``: at the end of epoch
    ``epoch``, before the task boundary's merge and the epoch's checkpoint (this callback comes first).
    """

    def __init__(self, flag: str, epoch: int, hook: str = "batch", batch: int = 0) -> None:
        self.flag, self.epoch, self.hook, self.batch = flag, epoch, hook, batch

    def _wait(self) -> None:
        ready, go = Path(self.flag + ".ready"), Path(self.flag + ".go")
        if go.exists():
            return  # this point was passed by an earlier process of the same run
        ready.write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # SIGINT raises KeyboardInterrupt here; SIGTERM only sets Lightning's flag

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.hook == "batch" and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self._wait()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.hook == "epoch_end" and trainer.current_epoch == self.epoch:
            self._wait()


def _command() -> list[str]:
    exe = shutil.which("ham-lightning")
    return [exe] if exe else [sys.executable, "-m", "ham_lightning.cli"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    return env


def _pause(flag: Path, epoch: int, hook: str = "batch", batch: int = 0) -> str:
    spec = {"class_path": "test_cli_resume.PauseAt",
            "init_args": {"flag": str(flag), "epoch": epoch, "hook": hook, "batch": batch}}
    return "--trainer.callbacks=" + json.dumps([spec])


def _default_sigint() -> None:
    # A shell's background job inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    path = tmp_path / f"log-{time.monotonic_ns()}.txt"
    with open(path, "w") as log:
        process = subprocess.Popen([*_command(), "fit", *args], cwd=tmp_path, env=_env(tmp_path), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_default_sigint)
    process.log_path = path  # type: ignore[attr-defined]
    return process


def _output(process: subprocess.Popen) -> str:
    return Path(process.log_path).read_text()  # type: ignore[attr-defined]


def _kill_when_paused(tmp_path: Path, args: list[str], flag: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start a run, wait until it pauses at ``flag``, send ``sig``, let it go on; its exit status and output."""
    process = _start(tmp_path, args)
    ready = Path(str(flag) + ".ready")
    deadline = time.monotonic() + 600
    while not ready.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before pausing:\n{_output(process)[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached its pause point")
        time.sleep(0.05)
    os.kill(process.pid, sig)
    time.sleep(0.2)
    Path(str(flag) + ".go").write_text("")
    return process.wait(timeout=600), _output(process)


def _final_state(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], json.loads((run / "results.json").read_text())


def _assert_same_run(resumed: Path, reference: Path) -> None:
    state, results = _final_state(resumed)
    ref_state, ref_results = _final_state(reference)
    assert results["accuracy_matrix"] == ref_results["accuracy_matrix"]  # floats of exact counts: bit for bit
    assert results.get("groups") == ref_results.get("groups")
    assert state.keys() == ref_state.keys()
    different = [k for k in state if not _equal(state[k], ref_state[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"


def _equal(a: object, b: object) -> bool:
    """Bitwise equality of tensors, and of the dicts / lists of them a state dict may hold (``ham_state``)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _write_config(tmp_path: Path, method: str) -> Path:
    config = json.loads(json.dumps(TINY_CONFIG))
    config["model"]["ham"]["method"] = method
    if method != "ham":
        config["model"]["ham"].update(BASELINE)
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _resume_args(run: Path, extra: list[str] | None = None) -> list[str]:
    """The README's resume command: the run's own config and its last checkpoint."""
    return ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
            *(extra or ["--trainer.callbacks=[]"])]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process runs with the subprocesses' single intra-op thread (restored after), so sums add up alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ham_killed_by_every_signal_mid_task_and_at_a_boundary_resumes_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """Three real processes, each killed with the README's resume command; the last resume and the
    uninterrupted reference run in-process (same command, no interpreter start)."""
    from ham_lightning.cli import cli

    config = _write_config(tmp_path, "ham")
    run = tmp_path / "runs" / "killed"
    # 3 tasks x 2 epochs: epochs 0-5, a boundary after every odd epoch; last.ckpt after every epoch.
    # SIGINT mid-epoch in task 0's second epoch (epoch 1): Lightning stops at once, exit 1; last.ckpt = epoch 0.
    flag = tmp_path / "int"
    status, output = _kill_when_paused(tmp_path, ["--config", str(config), "--run_name=killed",
                                                  _pause(flag, epoch=1, batch=1)], flag, signal.SIGINT)
    assert status == 1, output[-3000:]
    assert "Resume with" in output and not (run / "results.json").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0

    # SIGTERM at task 2's boundary (end of epoch 3): the epoch, merge and evaluation finish, last.ckpt is
    # written, and the run exits with 143 (not 0: it did not finish).
    flag = tmp_path / "term"
    status, output = _kill_when_paused(tmp_path, _resume_args(run, [_pause(flag, epoch=3, hook="epoch_end")]),
                                       flag, signal.SIGTERM)
    assert status == 143, output[-3000:]
    assert "SIGTERM" in output and not (run / "results.json").exists()
    assert "up to the end of epoch 4, 2 tasks finished" in output  # counted from 1 (Lightning's epoch 3)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 3
    assert len(next(v for k, v in ckpt["callbacks"].items() if "HierarchicalMergeCallback" in k)["rows"]) == 2

    # SIGKILL at the first batch after that boundary: nothing runs at exit; last.ckpt is the boundary's.
    flag = tmp_path / "kill"
    status, output = _kill_when_paused(tmp_path, _resume_args(run, [_pause(flag, epoch=4, batch=0)]), flag,
                                       signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3

    earlier = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["RunResults"]
    monkeypatch.chdir(tmp_path)
    cli(["fit", *_resume_args(run)])
    cli(["fit", "--config", str(config), "--run_name=reference"])
    results = json.loads((run / "results.json").read_text())
    assert results["fit_wall_time_s"] > earlier["fit_wall_time_s"] > 0  # the earlier processes' time added
    assert len(results["groups"]["assignment"]) == 3 and not results["groups"]["opened"][2]  # a slot reused
    _assert_same_run(run, tmp_path / "runs" / "reference")


# ---- the path users run: the quick start's settings (prefix cache, ridge head, protect_inputs), made small ----


def quick_args(cache: Path, runs: Path, name: str, logger: bool = False) -> list[str]:
    """The quick start (configs/quickstart.yaml: Lite0 with its real weights, cached prefix below blocks.6, ridge
    head, protect_inputs) on 3 tasks of 16 images a class at 32 px, 2 epochs a task of 2-3 batches, a 256-wide
    ridge."""
    return ["--data.num_tasks=3", "--data.limit_per_class_train=16", "--data.limit_per_class_test=4",
            "--data.image_size=32",
            "--data.epochs_per_task=2", "--data.batch_size=16", '--model.head_kwargs={"projection": 256}',
            "--data.prefix_cache.views=2", "--data.prefix_cache.progress=false",
            f"--data.prefix_cache.cache_dir={cache}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--runs_dir={runs}", f"--run_name={name}",
            *([] if logger else ["--trainer.logger=false"])]


#: results.json entries that differ between any two runs (times, memory, names and paths), not compared.
_RUN_SPECIFIC = {"run", "name", "fit_wall_time_s"}
_CONFIG_SPECIFIC = {"run_name", "ckpt_path", "config", "runs_dir", "trainer"}


def _comparable_results(results: dict) -> dict:
    out = {k: v for k, v in results.items() if k not in _RUN_SPECIFIC}
    out["config"] = {k: v for k, v in results["config"].items() if k not in _CONFIG_SPECIFIC}
    out["tasks"] = [{k: v for k, v in t.items() if k not in ("wall_time_s", "peak_memory_mb")}
                    for t in results["tasks"]]
    return out


def _assert_same_run_and_results(resumed: Path, reference: Path) -> None:
    """State dicts bit for bit, and results.json equal in every entry but times, memory and names."""
    _assert_same_run(resumed, reference)
    assert _comparable_results(_final_state(resumed)[1]) == _comparable_results(_final_state(reference)[1])


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A prefix cache and the uninterrupted quick-start run, in-process on one thread, shared by the tests."""
    from ham_lightning.cli import cli

    root = tmp_path_factory.mktemp("quick")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.chdir(root)
        cli(["fit", *quick_args(root / "cache", root / "runs", "reference")])
    torch.set_num_threads(threads)
    yield {"cache": root / "cache", "reference": root / "runs" / "reference"}


class SlowCheckpointWrites(Callback):
    """Writes checkpoints in 256 KB pieces 2 ms apart, and marks ``<flag>.<n>`` when the n-th write begins: so a
    test can SIGKILL the run at a chosen point of a checkpoint's bytes."""

    def __init__(self, flag: str) -> None:
        from ham_lightning.lightning import checkpoint_io

        count = [0]

        def slow(fd: int, data: memoryview) -> None:
            count[0] += 1
            Path(f"{flag}.{count[0]}").write_text(str(len(data)))
            for start in range(0, len(data), 1 << 18):
                os.write(fd, data[start:start + (1 << 18)])
                time.sleep(0.002)

        checkpoint_io._write_chunks = slow


def test_quick_start_killed_during_a_boundary_checkpoint_write_on_a_tmpfs_resumes_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None, quick: dict[str, Path]) -> None:
    """The run folder on a tmpfs, $TMPDIR elsewhere; SIGKILL at a random byte of task 1's boundary checkpoint
    (the 5th write: start, then epochs 0-3), twice; the resume loads the whole epoch-2 checkpoint and ends as
    the uninterrupted run, state_dict and results.json."""
    from helpers import mounted_tmpfs, unmount

    from ham_lightning.cli import cli

    mount = mounted_tmpfs(tmp_path / "mnt", "256m")
    try:
        (tmp_path / "tmp").mkdir()
        run = mount / "runs" / "killed"
        flag = tmp_path / "write"
        spec = {"class_path": "test_cli_resume.SlowCheckpointWrites", "init_args": {"flag": str(flag)}}
        args = [*quick_args(quick["cache"], mount / "runs", "killed"), "--trainer.callbacks=" + json.dumps([spec])]
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
        rng = random.Random(24)
        for attempt in range(2):
            process = _start(tmp_path, args if attempt == 0 else _resume_args(run, [args[-1]]))
            marker = Path(f"{flag}.{5 if attempt == 0 else 1}")  # a resume writes no start checkpoint
            deadline = time.monotonic() + 600
            while not marker.exists():
                assert process.poll() is None, _output(process)[-3000:]
                assert time.monotonic() < deadline, "the run never reached the write"
                time.sleep(0.01)
            size = int(marker.read_text() or 0) or 1
            time.sleep(rng.uniform(0.0, 0.002 * size / (1 << 18)))  # somewhere in the write
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
            for f in flag.parent.glob(f"{flag.name}.*"):
                f.unlink()
            ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # whole: the old one
            assert ckpt["epoch"] == 2
        monkeypatch.chdir(tmp_path)
        cli(["fit", *_resume_args(run)])
        assert not [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()]  # no checkpoint went via $TMPDIR
        _assert_same_run_and_results(run, quick["reference"])
    finally:
        unmount(mount)


class Crash(Callback):
    """Raises (as a crash would) at the start of batch ``batch`` of ``epoch``, or at the end of ``epoch`` before
    the boundary and its checkpoint (``hook="epoch_end"``: this callback runs before the merge callback)."""

    def __init__(self, epoch: int, batch: int = 0, hook: str = "batch") -> None:
        self.epoch, self.batch, self.hook = epoch, batch, hook

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.hook == "batch" and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("crash")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.hook == "epoch_end" and trainer.current_epoch == self.epoch:
            raise RuntimeError("crash")


@pytest.mark.parametrize(("method", "crash"), [  # 2 tasks x 2 epochs: epochs 0-3, a boundary after 1 and 3
    ("seq_lora", {"epoch": 1, "batch": 1}),  # mid-task, mid-epoch
    ("merge_sum", {"epoch": 1, "hook": "epoch_end"}),  # at a boundary, before its merge and checkpoint
    ("merge_average", {"epoch": 2, "batch": 0}),  # just after a boundary's checkpoint
    ("merge_ties", {"epoch": 3, "batch": 0}),  # mid-task, from a mid-task checkpoint after a merge
])
def test_baseline_under_the_quick_start_settings_crashed_resumes_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quick: dict[str, Path], method: str, crash: dict) -> None:
    """Each baseline (one slot, no learned scalars) on the quick start's path, crashed in-process and resumed with
    the README's command: state_dict and results.json as its uninterrupted run's."""
    from ham_lightning.cli import cli

    monkeypatch.chdir(tmp_path)
    method_args = [f"--model.ham.method={method}", "--model.ham.max_groups=1", "--model.ham.train_importance=false",
                   "--model.ham.train_group_scalars=false", "--data.num_tasks=2"]
    cli(["fit", *quick_args(quick["cache"], tmp_path / "runs", "reference"), *method_args])
    spec = {"class_path": "test_cli_resume.Crash", "init_args": crash}
    with pytest.raises(RuntimeError, match="crash"):
        cli(["fit", *quick_args(quick["cache"], tmp_path / "runs", "crashed"), *method_args,
             "--trainer.callbacks=" + json.dumps([spec])])
    run = tmp_path / "runs" / "crashed"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "results.json").exists()
    cli(["fit", *_resume_args(run)])
    _assert_same_run_and_results(run, tmp_path / "runs" / "reference")


class FillDisk(Callback):
    """At the start of epoch ``epoch``, fills the filesystem of ``path`` (a file there) until ``leave`` bytes are
    free: another program filling the disk while the run trains."""

    def __init__(self, path: str, leave: int, epoch: int = 0) -> None:
        self.path, self.leave, self.epoch = path, leave, epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            fill(Path(self.path), self.leave)


def fill(path: Path, leave: int) -> None:
    """Allocate a file at ``path`` so that ``leave`` bytes stay free on its filesystem."""
    size = shutil.disk_usage(path.parent).free - leave
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    finally:
        os.close(fd)


def _one_error_line(out: str, err: str) -> str:
    assert "Traceback" not in out + err
    errors = [line for line in (out + err).splitlines() if "error" in line.lower()]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_full_disk_stops_the_run_with_one_line_naming_the_file_and_keeps_the_earlier_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        quick: dict[str, Path]) -> None:
    """The run folder on a small tmpfs, W&B and CSV logging on. Too little room for two checkpoints: refused before
    the data is set up. Room, then the disk filled by another program after the start checkpoint: the next
    checkpoint cannot be written. Each time one error line naming the file, exit 1, no traceback; last.ckpt whole."""
    from helpers import mounted_tmpfs, offline_wandb, unmount

    from ham_lightning.cli import main

    size = (quick["reference"] / "checkpoints" / "last.ckpt").stat().st_size
    mount = mounted_tmpfs(tmp_path / "mnt", f"{size * 5 // 2 // 2**20}m")
    try:
        offline_wandb(monkeypatch, tmp_path)
        monkeypatch.delenv("WANDB_SILENT")  # what a user sees

        def run_main(name: str, *extra: str) -> tuple[int, str]:
            monkeypatch.setattr(sys, "argv", ["ham-lightning", "fit", *extra,
                                              *quick_args(quick["cache"], mount / "runs", name, logger=True)])
            capfd.readouterr()
            with pytest.raises(SystemExit) as exit_info:
                main()
            return exit_info.value.code, _one_error_line(*capfd.readouterr())

        fill(mount / "filler", size * 3 // 2)
        status, line = run_main("small")
        checkpoints = mount / "runs" / "small" / "checkpoints"
        assert status == 1 and line.startswith(f"ham-lightning: error: Cannot write the checkpoints {checkpoints}/"
                                               "last.ckpt: this run's need at least")
        assert "Free at least" in line and not (checkpoints / "last.ckpt").exists()
        (mount / "filler").unlink()

        spec = {"class_path": "test_cli_resume.FillDisk", "init_args": {"path": str(mount / "filler"),
                                                                         "leave": size // 2}}
        status, line = run_main("full", "--trainer.callbacks=" + json.dumps([spec]))
        run = mount / "runs" / "full"
        assert status == 1
        assert line.startswith(f"ham-lightning: error: Cannot write the checkpoint {run}/checkpoints/last.ckpt:")
        assert "no space left on device" in line and "Free at least" in line
        assert f"--ckpt_path {run}/checkpoints/last.ckpt" in line  # how to go on
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # the earlier one, whole
        assert ckpt["ham_lightning_cli"]["saved_at"] == "start"
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    finally:
        unmount(mount)

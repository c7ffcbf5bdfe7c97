"""``ham-lightning``: LightningCLI over a whole class-incremental sequence (train, merge, evaluate per task).

``ham-lightning fit`` with no ``--config`` runs the quick start (``configs/quickstart.yaml``: the digits data set
shipped with scikit-learn, the real ImageNet EfficientNet-Lite0, 5 tasks). ``ham-lightning fit --config
configs/<benchmark>.yaml`` runs a benchmark with that file's settings only; ``validate`` / ``test`` evaluate a
checkpoint on every task seen; ``predict`` writes the folded model's predictions. Two more commands work on what
runs left behind: ``export`` (PEFT adapter + folded timm weights of a checkpoint) and ``compare`` (a table and a
plot from the ``results.json`` of finished runs). Every knob of `HAMModule` (``--model.*``, ``--model.ham.*``),
`ClassIncrementalDataModule` (``--data.*``) and `HierarchicalMergeCallback` (``--merge.*``) is settable from YAML
and the command line; ``--print_config`` prints a complete, re-runnable config.

A run owns its folder ``<runs_dir>/<run_name>``: a new run never writes into a folder that holds another run,
and ``--ckpt_path <run>/checkpoints/last.ckpt`` (written after every epoch, so at every task boundary too) is the
one way to continue one, with the settings it started with.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from typing_extensions import override

from ham_lightning.core.config import HAMConfig
from ham_lightning.data import ClassIncrementalDataModule
from ham_lightning.lightning.callback import HierarchicalMergeCallback
from ham_lightning.lightning.module import HAMModule
from ham_lightning.lightning.progress import TaskProgressBar
from ham_lightning.lightning.results import RunResults, TaskLines
from ham_lightning.lightning.sequence import resolve_epochs_per_task

#: The quick start's settings: what ``ham-lightning <subcommand>`` uses when no ``--config`` is given.
QUICKSTART_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
#: Where the CLI keeps its own state in a Lightning checkpoint (the resolved config the run started with).
CHECKPOINT_KEY = "ham_lightning_cli"
#: Exit status of a run stopped by SIGTERM (the shell's convention, 128 + 15): it did not finish.
SIGTERM_EXIT = 143
#: The marker of a folder in use by a run (holds the owner's process id while it runs).
LOCK_NAME = ".ham-lightning.lock"

#: Settings a resumed run may change without changing its results (paths, workers, what is printed or logged).
RESUME_MAY_CHANGE = (
    "data.root", "data.num_workers", "data.pin_memory", "data.cache_dir", "data.verify_images", "data.download",
    "data.eval_batch_size", "merge.evaluate",
)
#: Trainer settings that change what a resumed run computes (the rest: devices, loggers, progress...).
RESUME_TRAINER_KEYS = (
    "max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "limit_train_batches", "deterministic",
)


def _backbone_name(backbone: Any) -> str | None:
    """The timm name a string backbone gives the datamodule's transforms (None for a module)."""
    return backbone if isinstance(backbone, str) else None


def wandb_offline() -> bool:
    """W&B runs offline unless the user set it up online (``WANDB_MODE=online`` or an API key in the env)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "run"):
        return False
    return mode in ("offline", "dryrun", "disabled") or not os.environ.get("WANDB_API_KEY")


# ---------------------------------------------------------------------------------------------------- run folders


class RunFolderError(RuntimeError):
    """A run folder that cannot be used: it holds another run, or another process is running in it."""


class RunFolder:
    """Exclusive use of ``path`` by this process: an advisory lock held until `release` (or the process's end).

    ``fcntl.flock`` locks go away with their process, even one killed by SIGKILL, so a killed run's folder can be
    resumed at once; two processes can never both hold one. Without ``fcntl`` (Windows) only the content check
    applies.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = open(self.path / LOCK_NAME, "a+")  # noqa: SIM115 (held open while the run lasts)
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise RunFolderError(
                f"{self.path} is in use by another run (process {owner}). Wait for it to end, or choose another "
                "--run_name."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._file = lock

    def others(self) -> list[str]:
        """What the folder holds besides the lock: another run's files."""
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME) if self.path.is_dir() else []

    def release(self) -> None:
        if self._file is not None:
            try:
                (self.path / LOCK_NAME).unlink(missing_ok=True)
            finally:
                self._file.close()  # closing the file drops the flock
                self._file = None


#: Run folders held by the CLI calls in progress in this process (released when each call returns).
_HELD: list[RunFolder] = []


def claim_new_run(runs_dir: Path, run_name: str | None, default_name: str) -> RunFolder:
    """A fresh folder for a new run: ``run_name`` if free, else refused; an automatic name gets ``-2``, ``-3``..."""
    candidates: Iterator[str]
    if run_name:
        candidates = iter([run_name])
    else:
        candidates = (default_name if k == 1 else f"{default_name}-{k}" for k in range(1, 1000))
    for name in candidates:
        folder = RunFolder(runs_dir / name)
        if folder.others():
            if run_name:
                _refuse_taken(folder)
            continue
        try:
            folder.acquire()
        except RunFolderError:
            if run_name:
                raise
            continue
        if folder.others():  # another run claimed and filled it between our check and our lock
            folder.release()
            if run_name:
                _refuse_taken(folder)
            continue
        return folder
    raise RunFolderError(f"No free run folder named {default_name}[-k] under {runs_dir}.")


def _refuse_taken(folder: RunFolder) -> None:
    shown = ", ".join(folder.others()[:4])
    resume = folder.path / "checkpoints" / "last.ckpt"
    hint = (f"; to continue that run: --ckpt_path {resume}" if resume.is_file() else "")
    raise RunFolderError(
        f"{folder.path} already holds a run ({shown}). A new run never writes into another run's folder: choose "
        f"another --run_name (or leave it out for a fresh dated one){hint}."
    )


def resumed_run_folder(ckpt_path: Path) -> Path | None:
    """The run folder a ``<run>/checkpoints/<file>.ckpt`` belongs to (None for a checkpoint kept elsewhere)."""
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent
    return None


# ---------------------------------------------------------------------------------------------------- callbacks


class SequenceCheckpoint(Checkpoint):
    """``<run>/checkpoints/last.ckpt`` after every training epoch, so also after every task boundary's merge.

    A `Checkpoint` subclass, so Lightning runs it after the other callbacks' epoch-end hooks (the boundary's
    merge and evaluation are in the file). Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes
    ``last.ckpt`` only with a top-k save, and skips epochs without an optimizer step (``ncm``), hence this one.
    ``trainer.save_checkpoint`` writes atomically (fsspec transaction), so a kill mid-write leaves the previous
    file whole. The file also holds the resolved CLI config, against which a resume is checked.
    """

    def __init__(self, dirpath: str | Path, config: dict[str, Any] | None = None,
                 resume_command: str | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.config = config
        self.resume_command = resume_command

    @property
    def path(self) -> Path:
        return self.dirpath / "last.ckpt"

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.path.exists():  # a new run: a kill in its first epoch still leaves a file to resume from
            self._save(trainer, "start")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, "epoch_end")

    def _save(self, trainer: Trainer, point: str) -> None:
        self._point = point
        trainer.save_checkpoint(self.path, weights_only=False)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"config": self.config, "saved_at": getattr(self, "_point", None),
                                      "format": 1}

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        what = "SIGTERM" if isinstance(exception, SIGTERMException) else "Interrupted"
        if self.path.is_file():
            rank_zero_info(f"{what}: the run stopped; {self.path} holds it {_checkpoint_point(self.path)}. "
                           f"Resume with:\n  {self.resume_command}")
        else:
            rank_zero_info(f"{what}: the run stopped before training started; nothing to resume (start it again).")


def _checkpoint_point(path: Path) -> str:
    """``at the start of training`` or ``up to the end of epoch N`` (for the message after a stop)."""
    try:
        import torch

        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a message only: never fail the shutdown over it
        return "as last saved"
    if (checkpoint.get(CHECKPOINT_KEY) or {}).get("saved_at") == "start":
        return "at the start of training"
    return f"up to the end of epoch {checkpoint.get('epoch', '?')}"


class RunConfig(SaveConfigCallback):
    """Writes the resolved config to ``<run>/config.yaml`` and logs all of it to every logger.

    Loggers get the whole config (model, HAM, optimizer, data, merge, trainer), so W&B runs and ``hparams.yaml``
    can be filtered and compared on any setting; Lightning itself logs only the module's init arguments.
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, run_dir: Path, write: bool,
                 logged: dict[str, Any]) -> None:
        super().__init__(parser, config, save_to_log_dir=False)
        self.run_dir, self.write, self.logged = run_dir, write, logged

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.write:
            self.parser.save(self.config, str(self.run_dir / "config.yaml"), skip_none=False, overwrite=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.logged)


# ---------------------------------------------------------------------------------------------------- the CLI


class HAMLightningCLI(LightningCLI):
    """LightningCLI with the HAM callback, run folder, loggers, checkpoints and the task schedule wired in."""

    run_dir: Path | None = None
    resuming: bool = False

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HierarchicalMergeCallback, "merge")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run folder name under --runs_dir (default: <benchmark>-<date>-<time>). A new run "
                                 "never writes into an existing run's folder.")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Where run folders are created.")
        parser.add_argument("--benchmark", type=str | None, default=None,
                            help="Benchmark name: the W&B group and the default run name (default: the config "
                                 "file's name).")
        parser.add_argument("--predict_path", type=str | None, default=None,
                            help="predict only: a folder of images (searched recursively) to predict; default: "
                                 "every task's test split.")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("model.backbone", "data.backbone", compute_fn=_backbone_name)
        _describe_ham_options(parser)

    # -- before anything is built -------------------------------------------------------------------------------
    @override
    def _parse_ckpt_path(self) -> None:
        """Refuse a resume whose settings contradict the checkpoint's (Lightning would silently take the
        checkpoint's model settings over the command line's)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        path = Path(ckpt_path)
        if not path.is_file():
            folder = resumed_run_folder(path)
            hint = (" That run stopped before its first epoch ended, so it has no checkpoint: start it again."
                    if folder is not None and folder.is_dir() else "")
            self._error(subcommand, f"--ckpt_path {ckpt_path}: no such file.{hint}")
        import torch

        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        given = _plain(config)
        saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("config")
        if saved is None:  # a checkpoint from the Python API: its module's and datamodule's init arguments
            saved = {"model": checkpoint.get("hyper_parameters", {}),
                     "data": checkpoint.get("datamodule_hyper_parameters", {})}
        differences = contradictions(saved, given)
        if differences:
            shown = "; ".join(f"{key}: checkpoint {_show(a)}, this command {_show(b)}" for key, a, b in differences)
            self._error(subcommand, (
                f"--ckpt_path {ckpt_path} was made with other settings: {shown}. A resumed run continues with the "
                "settings it started with: drop these options or resume with the run's own config (--config "
                "<run>/config.yaml); to change them, start a new run."
            ))

    @override
    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand
        config = self.config[subcommand] if subcommand else self.config
        self._check_config(subcommand, config)
        # What config.yaml and the checkpoint hold: the user's resolved config, before run folders are filled in
        # (re-running a saved config.yaml starts a new run rather than aiming at this one's folder).
        self.clean_config = config.clone()
        benchmark = config.get("benchmark") or _config_name(config) or "ham-lightning"
        ckpt_path = Path(config["ckpt_path"]) if config.get("ckpt_path") else None
        folder_of_ckpt = resumed_run_folder(ckpt_path) if ckpt_path is not None else None
        self.resuming = subcommand == "fit" and folder_of_ckpt is not None and folder_of_ckpt.is_dir()
        try:
            if self.resuming:
                assert folder_of_ckpt is not None
                folder = RunFolder(folder_of_ckpt)
                folder.acquire()
            else:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                default = f"{benchmark}-{stamp}" if subcommand == "fit" else f"{benchmark}-{subcommand}-{stamp}"
                folder = claim_new_run(Path(config["runs_dir"]), config.get("run_name"), default)
        except RunFolderError as err:
            self._error(subcommand, str(err))
        _HELD.append(folder)
        self.run_folder = folder
        self.run_dir = run_dir = folder.path
        self.benchmark = benchmark
        trainer = config["trainer"]
        trainer["default_root_dir"] = str(run_dir)
        method = _ham_value(config, "method") or "ham"
        for logger in _as_list(trainer.get("logger")):
            if not hasattr(logger, "get") or logger.get("init_args") is None:
                continue
            args, kind = logger["init_args"], str(logger.get("class_path", "")).rsplit(".", 1)[-1]
            if kind == "WandbLogger":
                args["save_dir"] = str(run_dir)
                args["name"] = args.get("name") or run_dir.name
                args["group"] = args.get("group") or benchmark
                args["tags"] = sorted({*(args.get("tags") or []), method})
                if wandb_offline():
                    args["offline"] = True
            elif "save_dir" in args:  # CSV, TensorBoard, MLflow (file store)...: inside the run folder
                args["save_dir"] = str(run_dir)

    def _check_config(self, subcommand: str | None, config: Any) -> None:
        """Settings that cannot work, refused before any model or data is built (the last line says the fix)."""
        ham = config.get("model", {}).get("ham")
        if ham is not None:
            try:
                HAMConfig(**_plain(ham))
            except (TypeError, ValueError) as err:
                self._error(subcommand, f"--model.ham: {err} Fix it in the config or with --model.ham.<option>.")
        try:
            resolve_epochs_per_task(config.get("merge", {}).get("epochs_per_task"),
                                    config.get("data", {}).get("epochs_per_task"))
        except MisconfigurationException as err:
            self._error(subcommand, str(err))

    def _error(self, subcommand: str | None, message: str) -> None:
        """jsonargparse's usage + ``error: message`` on stderr, exit status 2 (the message is the last line)."""
        parser = self._subcommand_parsers.get(subcommand, self.parser) if subcommand else self.parser
        parser.error(message)

    # -- the trainer --------------------------------------------------------------------------------------------
    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        data = self.datamodule
        merge = self.config_init[self.subcommand]["merge"] if self.subcommand else None
        epochs = resolve_epochs_per_task(getattr(merge, "epochs_per_task", None),
                                         getattr(data, "epochs_per_task", None))
        num_tasks = getattr(data, "num_tasks", None)
        if epochs and num_tasks:
            needed = epochs * num_tasks
            if config.get("max_epochs") is None:
                config["max_epochs"] = needed  # the whole sequence in one fit
            elif self.subcommand == "fit" and config["max_epochs"] < needed:
                self._error(self.subcommand, (
                    f"--trainer.max_epochs {config['max_epochs']} ends the sequence before its last task ({num_tasks} "
                    f"tasks x {epochs} epochs = {needed}). Leave max_epochs out: the CLI sets it from the schedule."
                ))
            if not config.get("reload_dataloaders_every_n_epochs"):
                config["reload_dataloaders_every_n_epochs"] = 1  # each task serves its own loader
        if self.subcommand == "fit" and config.get("limit_val_batches") is None:
            config["limit_val_batches"] = 0  # fit evaluates at task boundaries (the accuracy matrix), not per epoch
        assert self.run_dir is not None
        run_dir = self.run_dir
        clean = _plain(self.clean_config)
        callbacks = list(callbacks)
        if self.subcommand == "fit" and config.get("enable_checkpointing") is not False:
            callbacks.append(SequenceCheckpoint(run_dir / "checkpoints", config=clean,
                                                resume_command=self.resume_command()))
        run = {"run_dir": str(run_dir), "run_name": run_dir.name, "benchmark": self.benchmark,
               "resumed_from": clean.get("ckpt_path"), "max_epochs": config.get("max_epochs"),
               "epochs_per_task": epochs}
        callbacks.append(RunResults(dirpath=str(run_dir), config=clean, run=run))
        callbacks.append(TaskLines())
        progress = config.get("enable_progress_bar") is not False
        if progress and not any(isinstance(c, TaskProgressBar) for c in _as_list(config.get("callbacks"))):
            callbacks.append(TaskProgressBar())
        callbacks.append(RunConfig(self._parser(self.subcommand), self.clean_config, run_dir,
                                   write=not (self.resuming and (run_dir / "config.yaml").is_file()),
                                   logged={**clean, "run": run}))
        self.save_config_callback = None  # RunConfig above replaces Lightning's (which writes into a logger's dir)
        return super()._instantiate_trainer(config, callbacks)

    def resume_command(self) -> str:
        assert self.run_dir is not None
        return (f"ham-lightning fit --config {self.run_dir / 'config.yaml'} "
                f"--ckpt_path {self.run_dir / 'checkpoints' / 'last.ckpt'}")

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        finished = False
        try:
            if subcommand == "predict":
                self.predict()
            else:
                super()._run_subcommand(subcommand)
            finished = True
        finally:
            self._finish_wandb(finished)
            self.release()

    def predict(self) -> Path:
        """``ham-lightning predict``: the folded model's predictions among every class it has learned, for each
        image of ``--predict_path`` (or of every task's test split), written to ``<run>/predictions.csv``."""
        import csv

        import torch

        config = self.config_init["predict"]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            self._error("predict", "predict needs --ckpt_path (a checkpoint of `ham-lightning fit`).")
        dataset, rows = self._predict_dataset(config.get("predict_path"))
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.datamodule.eval_batch_size,
                                             num_workers=self.datamodule.num_workers)
        self.trainer.callbacks.append(_FoldForPredict())
        outputs = self.trainer.predict(self.model, dataloaders=loader, ckpt_path=ckpt_path)
        logits = torch.cat([o.float() for o in outputs]) if outputs else torch.empty(0, 0)
        seen = getattr(getattr(self.model, "head", None), "seen", None)
        if seen is not None and bool(seen.any()):
            logits = logits.masked_fill(~seen.to(logits.device), float("-inf"))  # among the classes learned
        probability, predicted = logits.softmax(dim=1).max(dim=1)
        names = self.datamodule.class_names
        assert self.run_dir is not None
        path = self.run_dir / "predictions.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*rows[0].keys(), "predicted", "predicted_name", "probability"] if rows else [])
            for row, k, prob in zip(rows, predicted.tolist(), probability.tolist()):
                writer.writerow([*row.values(), k, names[k] if names else "", f"{prob:.6f}"])
        rank_zero_info(f"Predictions of {len(rows)} images: {path}")
        return path

    def _predict_dataset(self, folder: str | None) -> tuple[Any, list[dict[str, Any]]]:
        """Images only (what ``predict_step`` gets) and, per image, what identifies it in the CSV."""
        import torch

        dm = self.datamodule
        if folder is None:
            dm.setup("test")
            datasets = [dm.task_dataset(t, "test") for t in range(dm.num_tasks)]
            rows = [{"task": t, "index": i, "label": int(label)}
                    for t, d in enumerate(datasets) for i, label in enumerate(d.targets().tolist())]
            return _ImagesOnly(torch.utils.data.ConcatDataset(datasets)), rows
        from ham_lightning.data.image_store import is_image_file

        files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p.name))
        if not files:
            self._error("predict", f"--predict_path {folder}: no image files there.")
        return _ImageFiles(files, dm.eval_transform), [{"file": f} for f in files]

    def _finish_wandb(self, finished: bool) -> None:
        """Close this command's W&B run (flushed to disk offline), so the next command in the process gets its
        own: Lightning's WandbLogger would otherwise reuse the run left open."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in getattr(getattr(self, "trainer", None), "loggers", []):
            if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
                logger._experiment.finish(exit_code=0 if finished else 1)

    def release(self) -> None:
        """Give the run folder up (the end of the subcommand; the process's end does it too)."""
        folder = getattr(self, "run_folder", None)
        if folder is not None:
            folder.release()
            if folder in _HELD:
                _HELD.remove(folder)


class _FoldForPredict(Callback):
    """Fold the merged adapters into the weights once the checkpoint is loaded: bare-backbone inference."""

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        controller = getattr(pl_module, "ham", None)
        if controller is not None and hasattr(controller, "fold"):
            controller.fold()


class _ImagesOnly:
    """``(image, label)`` items as images alone: what a LightningModule's default ``predict_step`` takes."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index][0]


class _ImageFiles:
    """Image files decoded to RGB and given the datamodule's eval transform."""

    def __init__(self, files: list[str], transform: Any) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        import torch

        from ham_lightning.data.image_store import decode_rgb

        image = torch.from_numpy(decode_rgb(self.files[index], self.files[index])).permute(2, 0, 1)
        return self.transform(image)


# ---------------------------------------------------------------------------------------------------- helpers


def contradictions(saved: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved, given)`` for every setting that changes what a run computes and differs between a
    checkpoint's config and a resume's (keys absent from either side are not compared)."""
    flat_saved, flat_given = _flatten(saved), _flatten(given)
    out = []
    for key in sorted(flat_saved.keys() & flat_given.keys()):
        top = key.split(".", 1)[0]
        relevant = (top in ("model", "data", "merge", "seed_everything")
                    or (top == "trainer" and key.split(".")[1] in RESUME_TRAINER_KEYS))
        if not relevant or key in RESUME_MAY_CHANGE or any(key.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            continue
        if _normal(flat_saved[key]) != _normal(flat_given[key]):
            out.append((key, flat_saved[key], flat_given[key]))
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value} if prefix else {}


def _normal(value: Any) -> Any:
    """Values compared as JSON: tuples as lists, 3 == 3.0."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _ham_value(config: Any, key: str) -> Any:
    ham = config.get("model", {}).get("ham")
    return ham.get(key) if ham is not None and hasattr(ham, "get") else None


def _config_name(config: Any) -> str | None:
    """The stem of the last ``--config`` file (``configs/cifar100_10_vit_b16.yaml`` -> ``cifar100_10_vit_b16``)."""
    files = config.get("config") or config.get("__default_config__")
    files = _as_list(files)
    return Path(str(files[-1])).stem if files else None


def _ham_field_helps() -> dict[str, str]:
    from dataclasses import fields

    return {f.name: f.metadata["help"] for f in fields(HAMConfig) if f.metadata.get("help")}


def _document_ham_config() -> None:
    """An ``Args:`` section in HAMConfig's docstring from its fields' ``metadata["help"]``, once: jsonargparse
    describes a dataclass's options (``--model.ham.help HAMConfig``) from its docstring, not from metadata."""
    doc = HAMConfig.__doc__ or ""
    if "\n    Args:\n" in doc:
        return
    lines = [f"        {name}: {text}" for name, text in _ham_field_helps().items()]
    HAMConfig.__doc__ = doc.rstrip() + "\n\n    Args:\n" + "\n".join(lines) + "\n"


def _describe_ham_options(parser: LightningArgumentParser) -> None:
    """Help that helps: ``--model.ham`` lists HAM's options with their descriptions (from HAMConfig's field
    metadata), and options typed ``nn.Module`` do not list every ``nn.Module`` subclass there is."""
    _document_ham_config()
    fields = "; ".join(f"{name}: {text.rstrip('.')}" for name, text in _ham_field_helps().items())
    for action in parser._actions:
        dest = getattr(action, "dest", "")
        if dest == "model.ham":
            action.help = (f"{action.help or ''} Set each with --model.ham.<option> (or --model.ham.help HAMConfig "
                           f"for types and defaults). Options: {fields}.")
        if "Module" in str(getattr(action, "_typehint", "")) and hasattr(action, "extra_help"):
            # jsonargparse would list every importable nn.Module subclass (1,500+ lines, and seconds to find).
            action.extra_help = lambda: ", or any torch.nn.Module as class_path + init_args"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _plain(namespace: Any) -> Any:
    """A jsonargparse Namespace as plain dicts/lists (for results.json and checkpoints)."""
    if hasattr(namespace, "as_dict"):
        namespace = namespace.as_dict()
    if isinstance(namespace, dict):
        return {k: _plain(v) for k, v in namespace.items() if not re.match(r"^__", k)}
    if isinstance(namespace, (list, tuple)):
        return [_plain(v) for v in namespace]
    return namespace if isinstance(namespace, (str, int, float, bool, type(None))) else str(namespace)


TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "logger": [
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"project": "ham-lightning", "offline": True, "log_model": False}},
        # save_dir: the run folder (filled in by the CLI, as for every logger that has one).
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
    ],
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "deterministic": "warn",
}

def cli(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Build (and by default run) the CLI; ``args`` as on the command line, for tests and notebooks.

    Returns the `HAMLightningCLI` (the ``export`` and ``compare`` commands return what they wrote).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    parser_kwargs: dict[str, Any] = {"epilog": (
        "Also: `ham-lightning export --ckpt_path <run>/checkpoints/last.ckpt` (PEFT adapter + folded timm "
        "weights) and `ham-lightning compare runs/*` (table and plot from finished runs' results.json).")}
    argv = with_quickstart(argv)
    held = len(_HELD)
    try:
        return HAMLightningCLI(
            HAMModule,
            ClassIncrementalDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1993,
            parser_kwargs=parser_kwargs,
            args=argv,
            run=run,
        )
    finally:
        while len(_HELD) > held:  # a call that failed before its subcommand ran
            _HELD.pop().release()


# ---------------------------------------------------------------------------------------------------- export, compare


def export_checkpoint(ckpt_path: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Export a HAM checkpoint: the merged adapters as a PEFT LoRA adapter, and folded into a timm state dict.

    Writes into ``out`` (default: ``<run>/export`` for a run's checkpoint, else ``<ckpt folder>/export``):

    * ``peft_adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, ``base_model_name_or_path`` the
      timm name): ``PeftModel.from_pretrained(timm.create_model(name, pretrained=True, num_classes=0), path)``;
    * ``backbone_folded.safetensors``: the backbone with the merged delta written into its weights, loadable with
      ``timm.create_model(name, num_classes=0).load_state_dict(...)`` (no PEFT needed);
    * ``head.safetensors`` and ``export.json`` (backbone name and kwargs, head kind and scale, seen classes).

    BatchNorm statistics are frozen by default, so the adapter reproduces the model on the backbone's own
    pretrained weights; a model trained with ``freeze_norm: false`` has moved them, and they are then written to
    ``peft_adapter/base_buffers.safetensors`` (load them into the base before the adapter).
    """
    from safetensors.torch import save_file

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file.")
    run_dir = resumed_run_folder(ckpt_path)
    out = Path(out) if out is not None else (run_dir if run_dir is not None else ckpt_path.parent) / "export"
    # pretrained=False: the checkpoint holds every weight; no download or weight file is needed to export.
    model = HAMModule.load_from_checkpoint(ckpt_path, map_location="cpu", pretrained=False)
    model.eval()
    hparams = dict(model.hparams)
    name = hparams.get("backbone") if isinstance(hparams.get("backbone"), str) else None
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    adapter = model.export_peft(out / "peft_adapter")
    config_file = adapter / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = name
    config_file.write_text(json.dumps(adapter_config, indent=2))
    files["peft_adapter"] = adapter
    moved = _moved_norm_buffers(model)
    if moved:
        save_file(moved, str(adapter / "base_buffers.safetensors"))
        files["base_buffers"] = adapter / "base_buffers.safetensors"
    save_file(_tensors(model.folded_backbone_state_dict()), str(out / "backbone_folded.safetensors"))
    files["backbone_folded"] = out / "backbone_folded.safetensors"
    head = _tensors(model.head.state_dict())
    save_file(head, str(out / "head.safetensors"))
    files["head"] = out / "head.safetensors"
    seen = getattr(model.head, "seen", None)
    info = {
        "checkpoint": str(ckpt_path), "backbone": name, "pretrained": hparams.get("pretrained"),
        "backbone_kwargs": hparams.get("backbone_kwargs"), "num_classes": hparams.get("num_classes"),
        "head": hparams.get("head"), "head_scale": hparams.get("head_scale"),
        "seen_classes": [int(i) for i in seen.nonzero().flatten()] if seen is not None else None,
        "ham": hparams.get("ham"), "norm_buffers_moved": bool(moved),
    }
    (out / "export.json").write_text(json.dumps(info, indent=2))
    files["info"] = out / "export.json"
    return files


def _tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a state dict, contiguous copies (safetensors stores nothing else; a module's
    ``_extra_state``, such as HAM's merge history, is not part of a plain model)."""
    import torch

    return {k: v.detach().contiguous().clone() for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _moved_norm_buffers(model: HAMModule) -> dict[str, Any]:
    """BatchNorm running statistics of the backbone that training updated (``num_batches_tracked > 0``)."""
    from torch import nn

    out: dict[str, Any] = {}
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_batches_tracked is not None \
                and int(module.num_batches_tracked) > 0:
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"{name}.{buffer}"] = getattr(module, buffer).detach().clone()
    return out


def export_main(argv: Sequence[str]) -> dict[str, Path]:
    """``ham-lightning export --ckpt_path <ckpt> [--out <folder>]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ham-lightning export", description=export_checkpoint.__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="A checkpoint of `ham-lightning fit` (or HAMModule).")
    parser.add_argument("--out", default=None, help="Output folder (default: <run>/export).")
    ns = parser.parse_args(list(argv))
    try:
        files = export_checkpoint(ns.ckpt_path, ns.out)
    except FileNotFoundError as err:
        parser.error(str(err))
    for key, path in files.items():
        print(f"{key}: {path}")
    return files


def compare_main(argv: Sequence[str]) -> dict[str, Any]:
    """``ham-lightning compare runs/* [--out <folder>]``: table and plot from finished runs' ``results.json``."""
    import argparse

    from ham_lightning.lightning.results import compare_runs

    parser = argparse.ArgumentParser(
        prog="ham-lightning compare",
        description="A table and a plot from finished runs' results.json (nothing is re-run). Folders without "
                    "results.json (unfinished runs) are skipped and named.")
    parser.add_argument("runs", nargs="+", help="Run folders (or their results.json), e.g. runs/*.")
    parser.add_argument("--out", default="comparison", help="Where compare.md, compare.json and compare.png go.")
    ns = parser.parse_args(list(argv))
    finished = [p for p in ns.runs if Path(p, "results.json").is_file() or
                (Path(p).is_file() and Path(p).name == "results.json")]
    skipped = [p for p in ns.runs if p not in finished]
    if skipped:
        print(f"skipped (no results.json): {', '.join(skipped)}", file=sys.stderr)
    if not finished:
        parser.error("none of the given folders holds a finished run's results.json.")
    result = compare_runs(finished, ns.out)
    print(result["table"])
    for key, path in result["files"].items():
        print(f"{key}: {path}")
    return result


def with_quickstart(argv: list[str]) -> list[str]:
    """``argv`` with ``--config configs/quickstart.yaml`` after the subcommand when no ``--config`` is given.

    The quick start's settings are a config file like any other, so they never leak into a ``--config`` run.
    """
    subcommands = LightningCLI.subcommands()
    position = next((i for i, a in enumerate(argv) if a in subcommands), None)
    if position is None or any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        return argv
    if not QUICKSTART_CONFIG.is_file():
        raise FileNotFoundError(
            f"No --config given, and the quick start's config {QUICKSTART_CONFIG} is missing (ham-lightning "
            "installed without its repository?). Pass --config <file>.yaml.")
    return [*argv[: position + 1], "--config", str(QUICKSTART_CONFIG), *argv[position + 1:]]


def main() -> None:
    """Entry point of the ``ham-lightning`` command."""
    argv, sys.argv[1:] = sys.argv[1:], []  # handed over as args (LightningCLI warns when both are set)
    try:
        cli(argv)
    except SIGTERMException:
        sys.exit(SIGTERM_EXIT)  # stopped, not finished: a scheduler must not take it for a success


if __name__ == "__main__":
    main()

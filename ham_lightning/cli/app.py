"""The ``ham-lightning`` command: `HAMLightningCLI` (LightningCLI with HAM's callback, run folder, loggers,
checkpoints and task schedule wired in), `cli` for tests and notebooks, and `main`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from typing_extensions import override

from ham_lightning.cli.checkpoint import CHECKPOINT_KEY, SequenceCheckpoint
from ham_lightning.cli.compare import compare_main
from ham_lightning.cli.config import (
    TRAINER_DEFAULTS,
    RunConfig,
    _as_list,
    _backbone_name,
    _config_name,
    _describe_ham_options,
    _ham_value,
    _plain,
    _show,
    link_prefix_cut,
    wandb_offline,
    with_quickstart,
)
from ham_lightning.cli.distributed import (
    RUN_DIR_ENV,
    is_rank_zero,
    launch_rank,
    publish_run_dir,
    run_folder_for,
    unpublish_run_dir,
)
from ham_lightning.cli.export import export_main
from ham_lightning.cli.failures import refuse_resuming_an_unstarted_run, write_failure, write_failure_message
from ham_lightning.cli.noise import drop_wandb_anonymous, finish_wandb, known_noise_silenced
from ham_lightning.cli.predict import write_predictions
from ham_lightning.cli.resume import contradictions
from ham_lightning.cli.runs import _HELD, RunFolderError, resumed_run_folder
from ham_lightning.cli.tool_dirs import point_wandb
from ham_lightning.core.config import HAMConfig
from ham_lightning.core.registry import HEADS, load_plugins
from ham_lightning.data import READERS, ClassIncrementalDataModule
from ham_lightning.lightning.callback import HierarchicalMergeCallback
from ham_lightning.lightning.checkpoint_io import (
    check_room,
    checkpoint_bytes,
    previous_path,
    resume_checkpoint,
)
from ham_lightning.lightning.module import HAMModule
from ham_lightning.lightning.progress import TaskProgressBar
from ham_lightning.lightning.results import RunResults, TaskLines, TestResults
from ham_lightning.lightning.sequence import resolve_epochs_per_task

#: Exit status of a run stopped by SIGTERM (the shell's convention, 128 + 15): it did not finish.
SIGTERM_EXIT = 143


class HAMLightningCLI(LightningCLI):
    """LightningCLI with the HAM callback, run folder, loggers, checkpoints and the task schedule wired in."""

    run_dir: Path | None = None
    resuming: bool = False
    #: A damaged ``--ckpt_path`` whose predecessor the resume loads instead (set aside once the folder is held).
    _damaged_checkpoint: Path | None = None

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
        """Check ``--ckpt_path``: a damaged checkpoint is replaced by its whole predecessor (``last.prev.ckpt``,
        said on stderr), and a resume whose settings contradict the checkpoint's is refused (Lightning would
        silently take the checkpoint's model settings over the command line's)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        path = Path(ckpt_path)
        if not path.is_file() and not previous_path(path).is_file():
            folder = resumed_run_folder(path)
            hint = (" That run stopped before its first checkpoint, so there is nothing to resume: start it again "
                    "with the command that started it (the same --run_name reuses its folder)."
                    if folder is not None and folder.is_dir() else "")
            self._error(subcommand, f"--ckpt_path {ckpt_path}: no such file.{hint}")
        usable, problem = resume_checkpoint(path)
        if problem is not None and usable == path:
            self._error(subcommand, f"--ckpt_path {ckpt_path}: {problem} Start the run again (a new --run_name).")
        if usable != path:
            if is_rank_zero():
                print(f"ham-lightning: {problem}", file=sys.stderr)
            self._damaged_checkpoint = path  # moved aside once this process owns the run folder
            config["ckpt_path"] = ckpt_path = str(usable)
            path = usable
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
        run_of_ckpt = folder_of_ckpt if folder_of_ckpt is not None and folder_of_ckpt.is_dir() else None
        try:
            folder = run_folder_for(subcommand, config, benchmark, folder_of_ckpt if self.resuming else None,
                                    run_of_ckpt, self._damaged_checkpoint)
        except (RunFolderError, ValueError) as err:
            self._error(subcommand, str(err))
        _HELD.append(folder)
        self.run_folder = folder
        if is_rank_zero():  # for the processes the trainer's launcher starts (they inherit the environment)
            self._published = publish_run_dir(folder.path)
        self.run_dir = run_dir = folder.path
        self.benchmark = benchmark
        point_wandb(run_dir)
        trainer = config["trainer"]
        trainer["default_root_dir"] = str(run_dir)
        method = _ham_value(config, "method") or "ham"
        for logger in _as_list(trainer.get("logger")):
            if not hasattr(logger, "get") or logger.get("init_args") is None:
                continue
            args, kind = logger["init_args"], str(logger.get("class_path", "")).rsplit(".", 1)[-1]
            if kind == "WandbLogger":
                args["save_dir"] = str(run_dir)
                args["name"] = args.get("name") or (f"{run_dir.parent.name}-{run_dir.name}" if run_dir.parent
                                                    == run_of_ckpt else run_dir.name)
                args["group"] = args.get("group") or benchmark
                args["tags"] = sorted({*(args.get("tags") or []), method})
                if wandb_offline():
                    args["offline"] = True
            elif "save_dir" in args:  # CSV, TensorBoard, MLflow (file store)...: inside the run folder
                args["save_dir"] = str(run_dir)

    @override
    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand == "fit" and self.run_dir is not None and self.model is not None and is_rank_zero():
            # Before the data is set up (a prefix cache can take minutes): a folder too full for the checkpoints.
            check_room(self.run_dir / "checkpoints" / "last.ckpt", checkpoint_bytes(self.model))

    def _check_config(self, subcommand: str | None, config: Any) -> None:
        """Settings that cannot work, refused before any model or data is built (the last line says the fix)."""
        ham = config.get("model", {}).get("ham")
        if ham is not None:
            try:
                HAMConfig(**_plain(ham))
            except (TypeError, ValueError) as err:
                self._error(subcommand, f"--model.ham: {err} Fix it in the config or with --model.ham.<option>.")
        refused = link_prefix_cut(config)
        if refused:
            self._error(subcommand, refused)
        try:  # names of the registries: a typo fails here, not after the data set is read
            head = config.get("model", {}).get("head")
            if isinstance(head, str):
                HEADS.check(head, "--model.head")
            dataset = config.get("data", {}).get("dataset")
            if isinstance(dataset, str):
                READERS.check(dataset, "--data.dataset")
        except ValueError as err:
            self._error(subcommand, str(err))
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
        if self.subcommand == "test":
            callbacks.append(TestResults(str(run_dir), run={**run, "ckpt_path": clean.get("ckpt_path")}))
        progress = config.get("enable_progress_bar") is not False
        if progress and not any(isinstance(c, TaskProgressBar) for c in _as_list(config.get("callbacks"))):
            callbacks.append(TaskProgressBar())
        callbacks.append(RunConfig(self._parser(self.subcommand), self.clean_config, run_dir,
                                   write=not (self.resuming and (run_dir / "config.yaml").is_file()),
                                   logged={**clean, "run": run}))
        self.save_config_callback = None  # RunConfig above replaces Lightning's (which writes into a logger's dir)
        trainer = super()._instantiate_trainer(config, callbacks)
        drop_wandb_anonymous(trainer.loggers)
        return trainer

    def resume_command(self) -> str:
        assert self.run_dir is not None
        return (f"ham-lightning fit --config {self.run_dir / 'config.yaml'} "
                f"--ckpt_path {self.run_dir / 'checkpoints' / 'last.ckpt'}")

    @override
    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "test":
            kwargs["verbose"] = False  # TestResults prints percentages as fit does, not Lightning's fractions table
        return kwargs

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        finished = False
        failed_write: OSError | None = None
        try:
            if subcommand == "predict":
                self.predict()
            else:
                super()._run_subcommand(subcommand)
            finished = True
        except BaseException as err:
            failed_write = write_failure(err)
            if failed_write is not None and self.run_dir is not None:
                last = self.run_dir / "checkpoints" / "last.ckpt"
                if last.is_file() or previous_path(last).is_file():
                    failed_write.resume_command = self.resume_command()  # type: ignore[attr-defined]
            raise
        finally:
            self._finish_wandb(finished, quiet=failed_write is not None)
            self.release()

    def predict(self) -> Path:
        """``ham-lightning predict``: the folded model's predictions among every class it has learned, for each
        image of ``--predict_path`` (or of every task's test split), written to ``<run>/predictions.csv``."""
        return write_predictions(self)

    def _finish_wandb(self, finished: bool, quiet: bool = False) -> None:
        """Close this command's W&B run, so the next command in the process gets its own (`finish_wandb`)."""
        finish_wandb(getattr(getattr(self, "trainer", None), "loggers", []), finished, quiet)

    def release(self) -> None:
        """Give the run folder up (the end of the subcommand; the process's end does it too)."""
        folder = getattr(self, "run_folder", None)
        if folder is not None:
            folder.release()
            if folder in _HELD:
                _HELD.remove(folder)
        if hasattr(self, "_published"):
            unpublish_run_dir(self._published)
            del self._published


def cli(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Build (and by default run) the CLI; ``args`` as on the command line, for tests and notebooks.

    With ``args=None`` the command line is ``sys.argv[1:]``, which is left holding the whole command as parsed
    (the quick start's ``--config`` added): Lightning's DDP launcher starts the other ranks with ``sys.argv``.
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
    argv = with_quickstart(argv)  # idempotent: a relaunched rank's argv already has the --config
    if args is None:
        sys.argv[1:] = argv  # what the launcher relaunches; LightningCLI reads it (it warns when args is set too)
    load_plugins()  # packages that register merge rules, heads or readers (entry points "ham_lightning.plugins")
    refuse_resuming_an_unstarted_run(argv)
    held, published = len(_HELD), os.environ.get(RUN_DIR_ENV)
    try:
        with known_noise_silenced():
            return HAMLightningCLI(
                HAMModule,
                ClassIncrementalDataModule,
                trainer_defaults=TRAINER_DEFAULTS,
                seed_everything_default=1993,
                parser_kwargs=parser_kwargs,
                args=None if args is None else argv,
                run=run,
            )
    finally:
        while len(_HELD) > held:  # a call that failed before its subcommand ran
            _HELD.pop().release()
            unpublish_run_dir(published)


def main() -> None:
    """Entry point of the ``ham-lightning`` command."""
    try:
        cli()  # from sys.argv, which keeps the command for the ranks Lightning's DDP launcher starts
    except SIGTERMException:
        sys.exit(SIGTERM_EXIT)  # stopped, not finished: a scheduler must not take it for a success
    except Exception as err:
        failed = write_failure(err)
        if failed is None:
            raise
        rank = "" if is_rank_zero() else f" (rank {launch_rank()})"  # a write rank 0 did not make
        print(f"ham-lightning{rank}: error: {write_failure_message(failed)}", file=sys.stderr)
        sys.exit(1)

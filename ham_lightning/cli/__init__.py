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

One module per concern: `app` (the LightningCLI subclass, `cli`, `main`), `runs` (run folders and their locks),
`distributed` (under DDP, which rank owns the run folder), `checkpoint` (``last.ckpt``), `resume` (what a resume
may change), `config` (defaults, quick start, option help, ``config.yaml``), `tool_dirs` (where W&B and matplotlib
write), `predict`, `export`, `compare`, `noise` (known-harmless third-party messages silenced while a command
runs).
"""

from ham_lightning.cli.tool_dirs import point_matplotlib

point_matplotlib()  # before anything imports Lightning, which imports matplotlib

from ham_lightning.cli.app import SIGTERM_EXIT, HAMLightningCLI, cli, main
from ham_lightning.cli.checkpoint import CHECKPOINT_KEY, SequenceCheckpoint
from ham_lightning.cli.compare import compare_main
from ham_lightning.cli.config import (
    QUICKSTART_CONFIG,
    TRAINER_DEFAULTS,
    RunConfig,
    wandb_offline,
    with_quickstart,
)
from ham_lightning.cli.export import export_checkpoint, export_main
from ham_lightning.cli.predict import write_predictions
from ham_lightning.cli.resume import RESUME_MAY_CHANGE, RESUME_TRAINER_KEYS, contradictions
from ham_lightning.cli.runs import (
    LOCK_NAME,
    RunFolder,
    RunFolderError,
    claim_new_run,
    never_started,
    resumed_run_folder,
)
from ham_lightning.lightning.sequence import resolve_epochs_per_task

__all__ = [
    "CHECKPOINT_KEY", "LOCK_NAME", "QUICKSTART_CONFIG", "RESUME_MAY_CHANGE", "RESUME_TRAINER_KEYS", "SIGTERM_EXIT",
    "TRAINER_DEFAULTS", "HAMLightningCLI", "RunConfig", "RunFolder", "RunFolderError", "SequenceCheckpoint", "claim_new_run",
    "cli", "compare_main", "contradictions", "export_checkpoint", "export_main", "main", "never_started", "resolve_epochs_per_task",
    "resumed_run_folder", "wandb_offline", "with_quickstart", "write_predictions",
]

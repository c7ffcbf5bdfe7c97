"""The CLI under DDP: which process owns the run folder, and where the other ranks find it.

Only the process of global rank 0 claims, locks, resumes and writes the run folder; every other rank uses the
same folder without creating, locking or writing anything in it. Ranks are told apart at CLI time (before the
trainer exists) from the environment the launchers set: Lightning's own launcher (``LOCAL_RANK``, ``NODE_RANK``
for the processes it starts), torchrun (``RANK``), SLURM's srun (``SLURM_PROCID``), LSF (``JSM_NAMESPACE_RANK``).

Where the other ranks find the folder:

* Lightning's launcher (``--trainer.devices N`` on one command): rank 0 publishes its folder in
  ``HAM_LIGHTNING_RUN_DIR`` before the trainer starts the other processes, which inherit the environment;
* launchers that start every rank at once (torchrun, srun, one command per node): every process names the same
  folder, ``--runs_dir``/``--run_name`` (or a resumed ``--ckpt_path``'s run); a new ``fit`` without
  ``--run_name`` is refused on the other ranks, since each would pick its own dated name.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ham_lightning.cli.runs import RunFolder, claim_new_run
from ham_lightning.lightning.checkpoint_io import set_aside

#: Where rank 0 publishes its run folder for the processes Lightning's launcher starts (they inherit it).
RUN_DIR_ENV = "HAM_LIGHTNING_RUN_DIR"


def launch_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank as the launcher's environment says (0 with no launcher): only ``== 0`` is meant.

    torchrun's ``RANK`` is the global rank. A process started by Lightning's launcher has ``LOCAL_RANK`` (and
    ``NODE_RANK`` on other nodes) set, and is rank 0 only when both are 0; these are read before ``SLURM_PROCID``,
    which an sbatch script's single task also has (0) when Lightning starts the other processes itself.
    """
    env = os.environ if environ is None else environ
    if env.get("RANK"):
        return int(env["RANK"])
    if env.get("LOCAL_RANK") or env.get("NODE_RANK"):
        local, node = int(env.get("LOCAL_RANK") or 0), int(env.get("NODE_RANK") or 0)
        return local or node
    for key in ("SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if env.get(key):
            return int(env[key])
    return 0


def is_rank_zero(environ: dict[str, str] | None = None) -> bool:
    """Whether this process owns the run folder (global rank 0, or a single process)."""
    return launch_rank(environ) == 0


def publish_run_dir(path: Path) -> str | None:
    """Rank 0: ``path`` (absolute) in `RUN_DIR_ENV` for the processes its trainer starts; the previous value."""
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(path.resolve())
    return previous


def unpublish_run_dir(previous: str | None) -> None:
    """Rank 0, at the end of its command: `RUN_DIR_ENV` as it was before `publish_run_dir`."""
    if previous is None:
        os.environ.pop(RUN_DIR_ENV, None)
    else:
        os.environ[RUN_DIR_ENV] = previous


def shared_run_dir(subcommand: str | None, runs_dir: str, run_name: str | None, resumed: Path | None,
                   of_checkpoint: Path | None) -> Path:
    """The run folder of a rank other than 0, which rank 0 owns: its published one, else the folder every process
    names (``resumed``: a resumed fit's run; ``runs_dir/run_name``; for validate/test/predict, the checkpoint's
    run, where rank 0 writes in ``<run>/<command>``: these ranks write nothing). `ValueError` (one line, the fix)
    when no folder is named."""
    published = os.environ.get(RUN_DIR_ENV)
    if published:
        return Path(published)
    if resumed is not None:
        return resumed
    if run_name:
        return Path(runs_dir) / run_name
    if subcommand != "fit" and of_checkpoint is not None:
        return of_checkpoint
    raise ValueError(
        f"this process is rank {launch_rank()} of a distributed run started by an external launcher (torchrun, "
        "srun...), and no run folder is named: pass --run_name NAME (the same on every process) so that every "
        "process uses one folder.")


def run_folder_for(subcommand: str | None, config: Any, benchmark: str, resumed: Path | None,
                   of_checkpoint: Path | None, damaged: Path | None) -> RunFolder:
    """The run folder of this command. Rank 0 claims and locks it (`RunFolder.acquire`, `claim_new_run`) and
    moves a ``damaged`` checkpoint aside; any other rank gets the same folder (`shared_run_dir`), unlocked and
    untouched. ``resumed``: a resumed fit's run; ``of_checkpoint``: the run folder ``--ckpt_path`` is in.
    Raises `RunFolderError` (a folder in use or taken) or `ValueError` (no folder named on another rank)."""
    run_name, runs_dir = config.get("run_name"), config["runs_dir"]
    if not is_rank_zero():
        return RunFolder(shared_run_dir(subcommand, runs_dir, run_name, resumed, of_checkpoint))
    if resumed is not None:
        folder = RunFolder(resumed)
        folder.acquire()
        if damaged is not None:
            set_aside(damaged)  # so the next save keeps the whole predecessor as last.prev.ckpt
    elif subcommand != "fit" and of_checkpoint is not None and run_name in (None, of_checkpoint.name):
        # test / validate / predict on a run's checkpoint: beside the run, in <run>/<command>[-k], whatever
        # run name the run's own config.yaml holds (a --run_name of another name still gets its folder).
        folder = claim_new_run(of_checkpoint, None, str(subcommand))
    elif subcommand != "fit" and run_name and RunFolder(Path(runs_dir) / run_name).others():
        # A checkpoint kept elsewhere with a run's config.yaml, which names that (taken) run folder.
        folder = claim_new_run(Path(runs_dir), None, f"{run_name}-{subcommand}")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        default = f"{benchmark}-{stamp}" if subcommand == "fit" else f"{benchmark}-{subcommand}-{stamp}"
        folder = claim_new_run(Path(runs_dir), run_name, default, reuse_unstarted=subcommand == "fit")
        if folder.reused:
            print(f"ham-lightning: {folder.path} holds a run that stopped before its first checkpoint "
                  f"({', '.join(folder.others())}): starting it again there.", file=sys.stderr)
    return folder

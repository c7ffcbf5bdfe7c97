"""Where W&B and matplotlib keep their files: the run folder and the project's cache, not the home folder.

Standard library only: the package imports it first, because matplotlib reads ``MPLCONFIGDIR`` when it is
imported, and importing Lightning imports it (through torchmetrics).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The project's cache folder (the prefix cache's default, ``features/``, is in it).
PROJECT_CACHE = Path("~/.cache/ham_lightning")
#: Values this process set in the environment (a value the user set is never replaced).
_SET_HERE: dict[str, str] = {}


def _point(name: str, folder: Path) -> bool:
    current = os.environ.get(name)
    if current is not None and current != _SET_HERE.get(name):
        return False  # the user's own setting
    os.environ[name] = _SET_HERE[name] = str(folder.resolve())  # absolute: child processes may start elsewhere
    return True


def point_matplotlib() -> dict[str, str]:
    """``MPLCONFIGDIR`` (matplotlib's settings and font cache) -> ``<project cache>/matplotlib`` unless the user
    set it; effective only before matplotlib is imported. The variables set."""
    folder = PROJECT_CACHE.expanduser() / "matplotlib"
    return {"MPLCONFIGDIR": str(folder)} if _point("MPLCONFIGDIR", folder) else {}


def point_wandb(run_dir: Path) -> dict[str, str]:
    """W&B's artifact staging (``WANDB_DATA_DIR``, else ``~/.local/share/wandb``) -> ``<run>/wandb/data`` and its
    cache and debug logs (``WANDB_CACHE_DIR``, else ``~/.cache/wandb``) -> ``<project cache>/wandb``, each unless
    the user set it (its run files go to the run folder already: the logger's ``save_dir``). The variables set."""
    wanted = {"WANDB_DATA_DIR": run_dir / "wandb" / "data",
              "WANDB_CACHE_DIR": PROJECT_CACHE.expanduser() / "wandb"}
    return {name: str(folder) for name, folder in wanted.items() if _point(name, folder)}

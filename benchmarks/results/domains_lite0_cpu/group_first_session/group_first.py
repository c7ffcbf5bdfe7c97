"""Experiment (not a benchmark): first-session adaptation per group. A task that opens a group slot (the first task
of a domain) trains its adapter as usual; a task that joins an occupied slot trains nothing (its adapter keeps a
zero delta, so its merge changes nothing) and only adds its classes' statistics to the group's head. RanPAC / APER's
first-session adaptation, once per group instead of once per sequence: no task after a group's first can move
that group's features. Runs `benchmarks/ablate.py` in this process with `HAMModule.training_step` replaced:

    PYTHONPATH=. python benchmarks/results/domains_lite0_cpu/group_first_session/group_first.py --config \\
        configs/domains_lite0_cpu.yaml --num_tasks 10 --validation 0.2 --only default --out <dir>
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ham_lightning.lightning.module import HAMModule

train = HAMModule.training_step


def training_step(self: HAMModule, batch: Any, batch_idx: int) -> Any:
    planned = int(self.ham.router.planned)  # type: ignore[union-attr]
    if planned >= 0 and self.ham.occupied[planned]:  # type: ignore[union-attr]
        return None  # the slot has its first task's adapter: train nothing (Lightning skips the step)
    return train(self, batch, batch_idx)


if __name__ == "__main__":
    HAMModule.training_step = training_step  # type: ignore[method-assign]
    sys.path.insert(0, str(Path("benchmarks").resolve()))
    import ablate

    ablate.main(sys.argv[1:])

"""Runs a 2-task HAM sequence under DDP on 2 CPU processes (gloo) and saves each rank's state (test_callback)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from toy import ToyTaskData, quiet_trainer, toy_model

import ham_lightning as hl

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model, dm, cb = toy_model(num_classes=4), ToyTaskData(num_tasks=2, epochs_per_task=1), hl.HierarchicalMergeCallback()
    # find_unused_parameters=False: DDP raises if any trainable parameter (an empty slot's scalar) gets no grad.
    trainer = quiet_trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[cb], devices=2,
                            strategy=pl.strategies.DDPStrategy(process_group_backend="gloo",
                                                               find_unused_parameters=False))
    trainer.fit(model, dm)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if "group_" in k or "head" in k}
    torch.save({"tasks": cb.current_task, "rows": cb.rows, "state": state}, out / f"rank{trainer.global_rank}.pt")

"""Every merge rule resumes: a run killed after task 2 and resumed from ``last.ckpt`` ends as an uninterrupted run.

The checkpoint carries the whole sequence's state: the HAM tensors and the merge history and rule state (model
``state_dict``: ``<first HAM layer>.ham_state``), the task position and accuracy rows (the callback), the
optimizer and the loops.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from toy import ToyTaskData, quiet_trainer, toy_model

import ham_lightning as hl
from ham_lightning.core.config import METHODS

NUM_TASKS = 3


class Kill(pl.Callback):
    """Stops the process (an exception out of ``fit``) when the epoch ``at`` starts, as a crash would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.at:
            raise RuntimeError("killed")


def data() -> ToyTaskData:
    return ToyTaskData(num_tasks=NUM_TASKS, train_per_class=16, test_per_class=8, epochs_per_task=1)


def fit(method: str, seed: int, callbacks: list[pl.Callback], ckpt_path: Path | None = None,
        ham: dict | None = None, **trainer_kwargs) -> tuple[hl.HAMModule, hl.HierarchicalMergeCallback]:
    pl.seed_everything(seed, verbose=False)
    model = toy_model(max_groups=2 if method == "ham" else 1, method=method, **(ham or {}))
    merge = hl.HierarchicalMergeCallback()
    trainer = quiet_trainer(max_epochs=NUM_TASKS, reload_dataloaders_every_n_epochs=1, callbacks=[merge, *callbacks],
                            **trainer_kwargs)
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    return model, merge


#: An adapter whose A is computed from the task's inputs at the task's start (after the boundary the checkpoint
#: holds that A with B = 0, and the resumed fit computes it again).
INPUTS_INIT = {"adapter_init": "inputs", "protect_inputs": 0.9}


@pytest.mark.parametrize(("method", "ham"), [*((m, None) for m in METHODS), ("ham", INPUTS_INIT)],
                         ids=[*METHODS, "ham-inputs_init"])
def test_killed_after_task_2_resumes_from_last_ckpt_bit_for_bit(method: str, ham: dict | None,
                                                                tmp_path: Path) -> None:
    full_model, full = fit(method, 0, [], ham=ham)

    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # (save_top_k=0 would write no last.ckpt)
    with pytest.raises(RuntimeError, match="killed"):
        fit(method, 0, [last, Kill(at=2)], ham=ham, enable_checkpointing=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state_key = f"backbone.{hl.find_controller(full_model).state_name}"  # backbone.fc1.ham_state
    assert len(ckpt["state_dict"][f"{state_key}._extra_state"]["history"]) == 2  # stopped after task 2
    if method == "merge_ties":
        assert ckpt["state_dict"][f"{state_key}.merge_rule._extra_state"]["task_deltas"]

    # A different global seed and fresh objects: everything must come from the checkpoint.
    model, resumed = fit(method, 123, [], ckpt_path=tmp_path / "last.ckpt", ham=ham)
    assert resumed.rows == full.rows  # exact (correct, total) counts: the accuracy matrix bit for bit
    assert len(resumed.rows) == NUM_TASKS
    assert resumed.results()["accuracy_matrix"] == full.results()["accuracy_matrix"]
    assert resumed.results()["groups"] == full.results()["groups"]
    assert hl.find_controller(model).history == hl.find_controller(full_model).history
    state, full_state = model.state_dict(), full_model.state_dict()
    assert state.keys() == full_state.keys()
    for key, value in full_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key
    assert hl.find_controller(model).num_parameters() == hl.find_controller(full_model).num_parameters()

"""HierarchicalMergeCallback in Lightning: both ways of driving a sequence, resume, user modules, errors."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyTaskData, quiet_trainer, toy_model

import ham_lightning as hl

EPOCHS = 2


def slot_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "group_" in k or "lora_" in k or "importance" in k}


def run_one_fit(callback: hl.HierarchicalMergeCallback, **trainer_kwargs) -> hl.HAMModule:
    pl.seed_everything(0, verbose=False)
    model, dm = toy_model(), ToyTaskData(epochs_per_task=EPOCHS)
    trainer_kwargs.setdefault("callbacks", [callback])
    quiet_trainer(max_epochs=3 * EPOCHS, reload_dataloaders_every_n_epochs=1, **trainer_kwargs).fit(model, dm)
    return model


def run_fit_per_task(callback: hl.HierarchicalMergeCallback) -> hl.HAMModule:
    pl.seed_everything(0, verbose=False)
    model, dm = toy_model(), ToyTaskData()
    for _ in range(dm.num_tasks):
        quiet_trainer(max_epochs=EPOCHS, callbacks=[callback]).fit(model, dm)
    return model


def test_both_ways_of_driving_give_the_same_sequence() -> None:
    one, per_task = hl.HierarchicalMergeCallback(), hl.HierarchicalMergeCallback()
    model_a, model_b = run_one_fit(one), run_fit_per_task(per_task)
    ra, rb = one.results(), per_task.results()
    assert ra["accuracy_matrix"] == rb["accuracy_matrix"]
    assert len(ra["accuracy_matrix"]) == 3 and ra["accuracy_matrix"][2][2] is not None
    assert ra["groups"]["assignment"] == rb["groups"]["assignment"] == [0, 1, ra["groups"]["assignment"][2]]
    for k, v in slot_tensors(model_a).items():
        torch.testing.assert_close(v, slot_tensors(model_b)[k], rtol=0, atol=0, msg=k)
    assert ra["last_accuracy"] > 100 / 6 + 10  # learned something: well above chance over 6 classes


def test_optimizer_state_restarts_at_each_task() -> None:
    states: list[int] = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            states.append(len(trainer.optimizers[0].state))

    pl.seed_everything(0, verbose=False)
    model, dm = toy_model(), ToyTaskData(epochs_per_task=EPOCHS)
    # The merge callback runs first, so Probe sees the optimizer after any rebuild.
    quiet_trainer(max_epochs=3 * EPOCHS, reload_dataloaders_every_n_epochs=1,
                  callbacks=[hl.HierarchicalMergeCallback(), Probe()]).fit(model, dm)
    assert states[0] == 0 and states[1] > 0  # epoch 1 of task 0 keeps Adam's moments
    assert states[EPOCHS] == 0 and states[2 * EPOCHS] == 0  # first epoch of each new task: fresh optimizer


def test_resume_after_a_task_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    full = hl.HierarchicalMergeCallback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    model_full = run_one_fit(full, callbacks=[full, ckpt], enable_checkpointing=True)
    after_task_1 = tmp_path / f"epoch={2 * EPOCHS - 1}.ckpt"
    assert after_task_1.exists()

    pl.seed_everything(123, verbose=False)  # a different global seed: everything must come from the checkpoint
    resumed = hl.HierarchicalMergeCallback()
    model, dm = toy_model(), ToyTaskData(epochs_per_task=EPOCHS)
    quiet_trainer(max_epochs=3 * EPOCHS, reload_dataloaders_every_n_epochs=1, callbacks=[resumed]
                  ).fit(model, dm, ckpt_path=after_task_1)
    assert resumed.rows == full.rows  # exact (correct, total) counts: the accuracy matrix bit for bit
    assert resumed.results()["groups"] == full.results()["groups"]
    for k, v in slot_tensors(model_full).items():
        assert torch.equal(v, slot_tensors(model)[k]), k


def test_reused_trainer_and_missing_reload_are_refused() -> None:
    model, dm, cb = toy_model(), ToyTaskData(), hl.HierarchicalMergeCallback()
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(model, dm)
    with pytest.raises(MisconfigurationException, match="Create a new Trainer for each task"):
        trainer.fit(model, dm)
    with pytest.raises(MisconfigurationException, match="reload_dataloaders_every_n_epochs=2"):
        quiet_trainer(max_epochs=6, callbacks=[hl.HierarchicalMergeCallback()]).fit(
            toy_model(), ToyTaskData(epochs_per_task=2))


def test_state_mismatch_and_missing_pieces_are_refused() -> None:
    model, dm = toy_model(), ToyTaskData()
    quiet_trainer(max_epochs=1, callbacks=[hl.HierarchicalMergeCallback()]).fit(model, dm)
    with pytest.raises(MisconfigurationException, match="same HierarchicalMergeCallback instance"):
        quiet_trainer(max_epochs=1, callbacks=[hl.HierarchicalMergeCallback()]).fit(model, dm)

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(24, 6)

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(MisconfigurationException, match="has no HAM layers"):
        quiet_trainer(max_epochs=1, callbacks=[hl.HierarchicalMergeCallback()]).fit(Plain(), ToyTaskData())
    loader = ToyTaskData().train_dataloader()
    with pytest.raises(MisconfigurationException, match="needs a datamodule"):
        quiet_trainer(max_epochs=1, callbacks=[hl.HierarchicalMergeCallback()]).fit(toy_model(), loader)


def test_logged_boundary_metrics(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    cb = hl.HierarchicalMergeCallback()
    run_one_fit(cb, logger=CSVLogger(tmp_path, name="run"))
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    boundary = [r for r in rows if r.get("cl/task")]
    assert [float(r["cl/task"]) for r in boundary] == [0.0, 1.0, 2.0]
    assert float(boundary[-1]["cl/acc_seen"]) == pytest.approx(cb.results()["last_accuracy"])
    assert boundary[1]["ham/similarity_group_0"] != "" and float(boundary[1]["ham/opened"]) == 1.0


def test_conflicting_epochs_per_task_is_refused_with_what_to_keep() -> None:
    from ham_lightning.lightning.progress import task_description
    from ham_lightning.lightning.sequence import resolve_epochs_per_task

    cb = hl.HierarchicalMergeCallback(epochs_per_task=2)
    with pytest.raises(MisconfigurationException,
                       match=r"HierarchicalMergeCallback\(epochs_per_task=2\).*ToyTaskData\(epochs_per_task=3\).*"
                             r"keep its value and remove the callback's"):
        quiet_trainer(max_epochs=6, reload_dataloaders_every_n_epochs=1, callbacks=[cb]).fit(
            toy_model(), ToyTaskData(epochs_per_task=3))
    assert cb.current_task == 0 and not cb.rows  # refused before anything trained
    assert resolve_epochs_per_task(cb, ToyTaskData(epochs_per_task=2)) == 2  # the same value twice is fine
    assert resolve_epochs_per_task(cb, ToyTaskData()) == 2
    assert resolve_epochs_per_task(hl.HierarchicalMergeCallback(), ToyTaskData(epochs_per_task=3)) == 3
    assert resolve_epochs_per_task(hl.HierarchicalMergeCallback(), None) is None
    assert resolve_epochs_per_task(3, 3) == 3 and resolve_epochs_per_task(None, 2) == 2  # values, before building
    with pytest.raises(MisconfigurationException, match=r"--merge\.epochs_per_task 3\) and the datamodule\("
                                                        r"epochs_per_task=2\) \(CLI: --data\.epochs_per_task 2\)"):
        resolve_epochs_per_task(3, 2)

    class Stub:  # what task_description reads from a trainer
        callbacks = [hl.HierarchicalMergeCallback()]
        datamodule = ToyTaskData(epochs_per_task=3)
        current_epoch = 1

    assert task_description(Stub()) == "Task 1/3 · Epoch 2/3"  # type: ignore[arg-type]
    Stub.callbacks = [cb]
    with pytest.raises(MisconfigurationException, match="set twice"):
        task_description(Stub())  # type: ignore[arg-type]


def test_each_phase_of_a_task_boundary_is_a_profiler_action() -> None:
    """``Trainer(profiler="simple")`` times the merge, the post-merge statistics and the evaluation of every
    boundary (what `benchmarks/fit_rate.py` reports)."""
    from lightning.pytorch.profilers import SimpleProfiler

    profiler = SimpleProfiler()
    run_one_fit(hl.HierarchicalMergeCallback(), profiler=profiler)
    phases = {k: len(v) for k, v in profiler.recorded_durations.items() if k.startswith("[TaskBoundary]")}
    assert sorted(phases) == ["[TaskBoundary]evaluate seen tasks", "[TaskBoundary]merge",
                              "[TaskBoundary]statistics pass (head fit, input subspace)"]
    assert set(phases.values()) == {3}  # three tasks, one of each per boundary

"""FeatureDrift: the cosine matrix has one row per task, 1.0 on the diagonal, and sees real drift."""

from __future__ import annotations

import torch
from toy import ToyTaskData, quiet_trainer, toy_model

import ham_lightning
from ham_lightning.lightning.drift import FeatureDrift


def test_feature_drift_matrix_over_a_sequence():
    torch.manual_seed(0)
    model = toy_model(max_groups=2, lr=0.05)
    drift = FeatureDrift(probe_size=16)
    merge = ham_lightning.HierarchicalMergeCallback()
    quiet_trainer(max_epochs=6, reload_dataloaders_every_n_epochs=1, callbacks=[merge, drift]).fit(
        model, ToyTaskData(num_tasks=3, epochs_per_task=2))
    cos = drift.results()["feature_cosine"]
    assert [len(r) for r in cos] == [1, 2, 3]
    assert all(abs(r[-1] - 1.0) < 1e-3 for r in cos)  # a task's own reference
    assert cos[2][0] < 0.9999  # training tasks 1 and 2 moved task 0's features
    assert drift.results()["mean_cosine_old_tasks"][0] is None

"""HAMModule with statistics heads: a frozen backbone under ridge / NCM, and HAM adapters under a ridge head."""

from __future__ import annotations

import pytest
import torch
from toy import MLPBackbone, ToyTaskData, quiet_trainer

import ham_lightning


def _fit(model: ham_lightning.HAMModule, epochs: int = 1) -> ham_lightning.HierarchicalMergeCallback:
    merge = ham_lightning.HierarchicalMergeCallback()
    quiet_trainer(max_epochs=3 * epochs, reload_dataloaders_every_n_epochs=1, callbacks=[merge]).fit(
        model, ToyTaskData(num_tasks=3, epochs_per_task=epochs))
    return merge


@pytest.mark.parametrize("head", ["ridge", "ncm"])
def test_frozen_backbone_with_a_statistics_head_trains_nothing_and_does_not_forget(head: str) -> None:
    torch.manual_seed(0)
    backbone = MLPBackbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = ham_lightning.HAMModule(backbone, num_classes=6, adapt=False, head=head,
                                    head_kwargs={"projection": 256} if head == "ridge" else None)
    assert model.ham is None and not any(p.requires_grad for p in model.parameters())
    results = _fit(model).results()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    matrix = results["accuracy_matrix"]
    assert results["last_accuracy"] > 80.0  # chance is 16.7%
    assert results["forgetting"] < 10.0
    assert "groups" not in results and len(matrix) == 3


def test_ham_adapters_under_a_ridge_head_fit_it_after_each_merge() -> None:
    torch.manual_seed(0)
    config = ham_lightning.HAMConfig(target_modules=["fc1", "fc2"], rank=4, max_groups=2, group_rank=8,
                                     protect_inputs=0.9)
    model = ham_lightning.HAMModule(MLPBackbone(), num_classes=6, ham=config, head="ridge",
                                    head_kwargs={"projection": 256},
                                    optimizer=lambda p: torch.optim.AdamW(p, lr=0.02))
    assert model.loss_head is not None and model.subspace is not None
    results = _fit(model, epochs=2).results()
    assert len(results["groups"]["assignment"]) == 3
    assert results["last_accuracy"] > 50.0  # chance is 16.7%
    assert not torch.isnan(model.head.lam) and model.head.count == 3 * 2 * 48
    assert all(k > 0 for k in model.subspace.ranks().values())
    # Calibrated probabilities: the head's temperature over the seen classes, 0 for unseen ones.
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(5, 24))
        probabilities = model.probabilities(logits)
    seen = model.head.seen
    torch.testing.assert_close(probabilities.sum(1), torch.ones(5))
    assert torch.all(probabilities[:, ~seen] == 0)
    temperature = float(model.head.temperature)
    assert temperature != 1.0
    torch.testing.assert_close(probabilities[:, seen], torch.softmax(logits[:, seen] / temperature, dim=1))


def test_mobilenetv3_head_width_is_the_pooled_feature_width() -> None:
    model = ham_lightning.HAMModule("mobilenetv3_small_050", num_classes=5, pretrained=False,
                                    ham={"target_modules": ["conv_pw"], "rank": 2, "max_groups": 1, "group_rank": 2})
    model.eval()
    with torch.no_grad():
        features = model.features(torch.randn(2, 3, 64, 64))
    assert model.head.linear.in_features == features.shape[1] == model.backbone.head_hidden_size
    assert model.backbone.head_hidden_size != model.backbone.num_features  # the case that broke num_features

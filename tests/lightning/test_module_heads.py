"""HAMModule with statistics heads: a frozen backbone under ridge / NCM, and HAM adapters under a ridge head."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from toy import MLPBackbone, ToyTaskData, quiet_trainer

import ham_lightning
from ham_lightning.core.grouped_head import GroupedHead
from ham_lightning.lightning.statistics import task_heads


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


class _BlockBackbone(torch.nn.Module):
    """`MLPBackbone` as ``blocks.0``: a block to adapt from (routing reads its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(MLPBackbone())
        self.num_features = self.blocks[0].num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _routed_model(route_head: bool, pseudo_features: int = 0, **ham: object) -> ham_lightning.HAMModule:
    torch.manual_seed(0)
    config = ham_lightning.HAMConfig(target_modules=["fc1", "fc2"], rank=4, max_groups=2, group_rank=8,
                                     routing=True, similarity_source="data", similarity_threshold=0.01,
                                     adapt_from="blocks.0", **ham)
    return ham_lightning.HAMModule(_BlockBackbone(), num_classes=6, ham=config, head="ridge",
                                   head_kwargs={"projection": 256}, route_head=route_head,
                                   pseudo_features=pseudo_features,
                                   optimizer=lambda params: torch.optim.AdamW(params, lr=0.02))


def test_route_head_scores_each_input_with_its_routed_groups_head() -> None:
    model = _routed_model(route_head=True)
    results = _fit(model).results()
    head = model.head
    assert isinstance(head, GroupedHead) and task_heads(model) == [head, model.loss_head]
    assignment = results["groups"]["assignment"]  # 3 tasks of 2 classes, 2 slots: one slot holds two tasks
    assert sorted(set(assignment)) == [0, 1]
    assert head.class_slot.tolist() == [g for g in assignment for _ in range(2)]
    for g, inner in enumerate(head.heads):  # each group's head was fitted on its own tasks' classes alone
        assert torch.nonzero(inner.seen).flatten().tolist() == [c for c in range(6) if assignment[c // 2] == g]
        assert inner.count == 48 * 2 * assignment.count(g)  # the training samples of its tasks
    x = ToyTaskData(num_tasks=3).train_set.tensors[0][:64]
    model.eval()
    with torch.no_grad():
        logits = model(x)
    probabilities = model.probabilities(logits)  # each input under its group head's temperature
    torch.testing.assert_close(probabilities.sum(1), torch.ones(64))
    slots = model.ham.last_routes.slots
    other = head.class_slot[None, :] != slots[:, None]
    assert other.any() and torch.isinf(logits[other]).all() and torch.isfinite(logits[~other]).all()
    with torch.no_grad():  # an input's scores are its slot's head's on the slot's classes, over its temperature
        g = int(slots[0])
        inner = head.heads[g]
        own = inner(model.features(x[:1]))[0, head.class_slot == g] / inner.temperature.float()
        torch.testing.assert_close(logits[0, head.class_slot == g], own, rtol=1e-5, atol=1e-5)
        calibrated = inner.probabilities(inner.eval_logits(inner(model.features(x[:1]))))[0, head.class_slot == g]
    torch.testing.assert_close(probabilities[0, head.class_slot == g], calibrated)
    assert results["last_accuracy"] > 60.0  # chance is 16.7%
    # every boundary records each used group head's chosen lam and temperature
    assert all(t["heads"]["head"][f"group{assignment[t['task']]}_lam"] > 0 for t in results["tasks"])
    assert all(list(t["heads"]) == ["head"] for t in results["tasks"])  # the group heads report through it


def test_route_head_needs_routing_and_is_inert_on_a_frozen_backbone() -> None:
    with pytest.raises(ValueError, match="set ham.routing=true"):
        ham_lightning.HAMModule(MLPBackbone(), num_classes=6, head="ridge", route_head=True,
                                ham=ham_lightning.HAMConfig(target_modules=["fc1", "fc2"]))
    frozen = ham_lightning.HAMModule(MLPBackbone(), num_classes=6, head="ridge", adapt=False, route_head=True)
    assert not frozen.route_head and not isinstance(frozen.head, GroupedHead)  # as the rest of `ham`: unused


@pytest.mark.parametrize("route_head", [False, True])
def test_pseudo_features_draw_earlier_classes_into_the_loss(route_head: bool) -> None:
    model = _routed_model(route_head=route_head, pseudo_features=24)
    assert model.class_statistics is not None
    results = _fit(model).results()
    assert model.class_statistics.known.all()  # every class's statistics, from the boundaries' statistics pass
    assert results["last_accuracy"] > 60.0
    # As if the last task were training again: draws from earlier classes only (of its own slot with route_head).
    model.train()
    current = model.loss_head.current
    if route_head:  # the later of the two tasks that share a slot, planned on that slot
        assignment = results["groups"]["assignment"]
        shared = max(set(assignment), key=assignment.count)
        later = max(t for t, g in enumerate(assignment) if g == shared)
        current.zero_()
        current[2 * later: 2 * later + 2] = True
        model.ham.router.planned.fill_(shared)
    drawn, labels, pool = model._pseudo_batch(model.loss_head)
    assert drawn.shape == (24, model.class_statistics.in_features) and not current[labels].any()
    if route_head:
        earlier = [c for t, g in enumerate(assignment) if g == shared and t != later for c in (2 * t, 2 * t + 1)]
        assert set(labels.tolist()) == set(torch.nonzero(pool).flatten().tolist()) == set(earlier)
    else:
        assert set(labels.tolist()) == set(torch.nonzero(pool).flatten().tolist()) == {0, 1, 2, 3}
    again = model._pseudo_batch(model.loss_head)
    assert torch.equal(again[0], drawn) and torch.equal(again[1], labels)  # seeded by task and step


def test_pseudo_features_need_adapters() -> None:
    with pytest.raises(ValueError, match="set pseudo_features=0"):
        ham_lightning.HAMModule(MLPBackbone(), num_classes=6, head="ridge", adapt=False, pseudo_features=8)


class _FirstStepA(pl.Callback):
    """Each task's ``A`` of every layer and its slot's protected subspace (projector, rank), as the task's first
    training step sees them."""

    def __init__(self) -> None:
        self.seen: list[dict[str, tuple[torch.Tensor, torch.Tensor, int]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        ctrl = pl_module.ham
        if ctrl.adapter_is_fresh:
            space = ctrl.subspace
            space.slot = int(ctrl.router.planned)
            self.seen.append({n: (layer.lora_A.detach().clone(), space.projector(n).clone(), space.ranks()[n])
                              for n, layer in ctrl.layers.items()})


def test_adapter_init_from_inputs_starts_off_its_slots_protected_inputs() -> None:
    """``adapter_init="inputs"`` under routing and group protection: every task's first step sees an ``A`` off the
    protected subspace of the slot it trains on, along its own inputs, not the seeded draw; and the run learns."""
    model = _routed_model(route_head=True, adapter_init="inputs", protect_inputs=0.9, protect_scope="group")
    first = _FirstStepA()
    merge = ham_lightning.HierarchicalMergeCallback()
    quiet_trainer(max_epochs=3, reload_dataloaders_every_n_epochs=1, callbacks=[merge, first]).fit(
        model, ToyTaskData(num_tasks=3, epochs_per_task=1))
    assert len(first.seen) == 3  # each task's first step, with B still zero
    seeded = _routed_model(route_head=True).ham
    protected = 0
    for layers in first.seen:
        for name, (rows, projector, rank) in layers.items():
            assert not torch.allclose(rows, seeded.layers[name].lora_A)  # not the seeded draw
            assert (rows.norm(dim=1) <= 3 ** -0.5 + 1e-6).all() and (rows.norm(dim=1) > 0).all()
            if rank > 0:  # a slot with earlier tasks: off their inputs
                protected += 1
                assert (rows @ projector).abs().max() < 1e-4
    assert protected > 0
    assert merge.results()["last_accuracy"] > 60.0  # chance is 16.7%

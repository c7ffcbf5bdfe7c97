"""Merge rules (HAMConfig.method): the registry, each boundary rule checked numerically on tiny layers, their
state in the model's state_dict, and every rule in Lightning."""

from __future__ import annotations

import pytest
import torch
from toy import MLPBackbone, ToyTaskData, quiet_trainer, toy_model

import ham_lightning as hl
from ham_lightning.core import merge_rules as baselines
from ham_lightning.core.config import METHODS
from ham_lightning.core.controller import HAMController


def tiny(method: str, group_rank: int = 8, **kwargs) -> HAMController:
    torch.manual_seed(0)
    config = hl.HAMConfig(target_modules=["fc1", "fc2"], rank=2, max_groups=1, group_rank=group_rank,
                          method=method, **kwargs)
    return hl.inject(MLPBackbone(), config)


def train_fake(controller: HAMController, seed: int) -> dict[str, torch.Tensor]:
    """Give every active adapter a random B (as if trained); return each layer's dense task delta."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, layer in controller.layers.items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
            out[name] = (layer.lora_B @ layer.lora_A).clone()
    return out


def slot(controller: HAMController, name: str) -> torch.Tensor:
    B, A = controller.layers[name].group_delta(0)
    return B @ A


@pytest.mark.parametrize("method", ["merge_sum", "merge_average"])
def test_sum_and_average_of_task_deltas(method: str) -> None:
    ctl = tiny(method)
    deltas = []
    for t in range(3):
        deltas.append(train_fake(ctl, t))
        ctl.end_task()
        assert all(float(layer.lora_B.detach().abs().sum()) == 0 for layer in ctl.layers.values())  # fresh adapter
    for name in ctl.layers:
        total = sum(d[name] for d in deltas)
        expected = total if method == "merge_sum" else total / 3
        torch.testing.assert_close(slot(ctl, name), expected, rtol=1e-4, atol=1e-5)  # rank 6 <= cap 8: exact
    assert ctl.assignments == [0, 0, 0] and ctl.history[0].opened and not ctl.history[1].opened


def test_first_session_keeps_the_first_task_only() -> None:
    ctl = tiny("first_session")
    first = train_fake(ctl, 0)
    ctl.end_task()
    for t in (1, 2):
        train_fake(ctl, t)
        ctl.end_task()
    for name in ctl.layers:
        torch.testing.assert_close(slot(ctl, name), first[name], rtol=1e-5, atol=1e-6)
    assert [d.kept_fraction for d in ctl.history] == [1.0, 0.0, 0.0]


def test_merge_sum_caps_the_rank_by_svd() -> None:
    ctl = tiny("merge_sum", group_rank=2)
    deltas = [train_fake(ctl, 0)]
    ctl.end_task()
    deltas.append(train_fake(ctl, 1))
    ctl.end_task()
    B, A = ctl.layers["fc1"].slot_factors(0)
    assert B.shape[1] == 2
    U, S, Vh = torch.linalg.svd(deltas[0]["fc1"] + deltas[1]["fc1"])
    torch.testing.assert_close(B @ A, (U[:, :2] * S[:2]) @ Vh[:2], rtol=1e-4, atol=1e-4)


def test_merge_absorbs_the_group_scalar() -> None:
    ctl = tiny("merge_average")
    d0 = train_fake(ctl, 0)
    ctl.end_task()
    with torch.no_grad():
        ctl.layers["fc1"].group_scalars[0] = 0.5  # shared by all layers (scalar_granularity="adapter")
    d1 = train_fake(ctl, 1)
    ctl.end_task()
    torch.testing.assert_close(slot(ctl, "fc1"), (0.5 * d0["fc1"] + d1["fc1"]) / 2, rtol=1e-4, atol=1e-5)


def test_ties_matches_peft_on_dense_deltas() -> None:
    from peft.utils.merge_utils import ties

    ctl = tiny("merge_ties", group_rank=32, density=0.4)  # cap >= full rank: the re-factorisation is exact
    deltas = []
    for t in range(3):
        deltas.append(train_fake(ctl, 10 + t))
        ctl.end_task()
    for name in ctl.layers:
        expected = ties([d[name] for d in deltas], torch.ones(3), 0.4, majority_sign_method="total")
        torch.testing.assert_close(slot(ctl, name), expected, rtol=1e-4, atol=1e-5)
    assert len(ctl.merge_rule.task_deltas["fc1"]) == 3
    assert ctl.num_parameters()["adapter_stored"] > tiny("merge_sum", group_rank=32).num_parameters()["adapter_stored"]


def test_seq_lora_keeps_the_adapter_and_merges_nothing() -> None:
    ctl = tiny("seq_lora")
    train_fake(ctl, 0)
    before = {n: (layer.lora_A.clone(), layer.lora_B.clone()) for n, layer in ctl.layers.items()}
    ctl.end_task()
    for n, layer in ctl.layers.items():
        torch.testing.assert_close(layer.lora_A, before[n][0], rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B, before[n][1], rtol=0, atol=0)
    assert ctl.occupied == [False] and ctl.num_tasks_merged == 1
    counts = ctl.num_parameters()
    assert counts["adapter_stored"] == sum(p.numel() for p in ctl.adapter_parameters() + ctl.scalar_parameters())


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="method"):
        hl.HAMConfig(method="nope")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["seq_lora", "merge_sum", "merge_average", "merge_ties"])
def test_every_method_runs_a_sequence_in_lightning(method: str) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    model, dm = toy_model(max_groups=1, method=method), ToyTaskData(epochs_per_task=1)
    callback = hl.HierarchicalMergeCallback()
    quiet_trainer(max_epochs=3, reload_dataloaders_every_n_epochs=1, callbacks=[callback]).fit(model, dm)
    results = callback.results()
    assert len(results["accuracy_matrix"]) == 3
    assert all(results["accuracy_matrix"][i][i] is not None for i in range(3))
    assert len(model.ham.history) == 3
    if method == "seq_lora":
        assert float(model.ham.layers["fc1"].lora_B.detach().abs().sum()) > 0  # never reset
    else:
        assert model.ham.occupied == [True]


def test_baseline_helpers() -> None:
    E = (torch.randn(5, 2), torch.randn(2, 4))
    D = (torch.randn(5, 2), torch.randn(2, 4))
    B, A = baselines.merge_average(E, D, 3, 8)
    torch.testing.assert_close(B @ A, (3 * E[0] @ E[1] + D[0] @ D[1]) / 4, rtol=1e-5, atol=1e-5)
    dense = torch.randn(5, 4)
    B, A = baselines.refactor(dense, 4)
    torch.testing.assert_close(B @ A, dense, rtol=1e-5, atol=1e-5)


# ---- the registry and the rules' state ---------------------------------------------------------------------------


def test_registry_lists_the_built_in_rules_and_builds_them() -> None:
    assert set(METHODS) <= set(baselines.list_merge_rules())
    for name in METHODS:
        rule = baselines.create_merge_rule(name)
        assert isinstance(rule, baselines.MergeRule) and rule.name == name
        assert tiny(name).merge_rule.name == name
    with pytest.raises(ValueError, match=r"unknown merge rule 'nope'; registered: .*merge_ties"):
        baselines.create_merge_rule("nope")
    with pytest.raises(ValueError, match="already registered"):
        baselines.register_merge_rule("ham")(type("Other", (baselines.MergeRule,), {}))
    with pytest.raises(ValueError, match=r"method must be one of .*seq_lora.*got 'ncm'"):
        hl.HAMConfig(method="ncm")  # type: ignore[arg-type]  # NCM is a head now, not a merge rule


def test_a_registered_rule_is_a_method() -> None:
    @baselines.register_merge_rule("test_freeze_adapter")
    class FreezeAdapter(baselines.SequentialLoRA):
        """seq_lora that counts its boundaries in a buffer (state in the model's state_dict)."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("boundaries", torch.zeros((), dtype=torch.long))

        def end_task(self, controller: HAMController) -> baselines.MergeDecision:
            self.boundaries += 1
            return super().end_task(controller)

    try:
        ctl = tiny("test_freeze_adapter")
        ctl.end_task()
        ctl.end_task()
        assert ctl.model.state_dict()[f"{ctl.state_name}.merge_rule.boundaries"] == 2
        assert ctl.num_tasks_merged == 2
    finally:
        baselines.MERGE_RULES.unregister("test_freeze_adapter")


@pytest.mark.parametrize("method", METHODS)
def test_history_and_rule_state_live_in_the_model_state_dict(method: str) -> None:
    ctl = tiny(method, group_rank=32)
    for t in range(2):
        train_fake(ctl, t)
        ctl.end_task()
    state = ctl.model.state_dict()
    key = ctl.state_name  # the state module sits under the first HAM layer
    assert key == "fc1.ham_state"
    assert [d["task"] for d in state[f"{key}._extra_state"]["history"]] == [0, 1]
    assert (f"{key}.merge_rule._extra_state" in state) == (method == "merge_ties")

    fresh = tiny(method, group_rank=32)
    fresh.model.load_state_dict(state)  # strict: same keys
    assert fresh.history == ctl.history
    if method == "merge_ties":
        assert [len(v) for v in fresh.merge_rule.task_deltas.values()] == [2, 2]
    # The next boundary gives the same result on the restored model.
    for c in (ctl, fresh):
        train_fake(c, 7)
        c.end_task()
    assert fresh.history == ctl.history
    for name in ctl.layers:
        assert torch.equal(slot(ctl, name), slot(fresh, name)), name
    assert fresh.num_parameters() == ctl.num_parameters()
    # A state dict taken earlier does not grow with later tasks.
    assert len(state[f"{key}._extra_state"]["history"]) == 2
    if method == "merge_ties":
        assert [len(v) for v in state[f"{key}.merge_rule._extra_state"]["task_deltas"].values()] == [2, 2]


def test_controller_state_dict_carries_the_rule_state() -> None:
    ctl = tiny("merge_ties", group_rank=32)
    for t in range(2):
        train_fake(ctl, t)
        ctl.end_task()
    other = tiny("merge_ties", group_rank=32)
    other.load_state_dict(ctl.state_dict())
    assert other.history == ctl.history
    assert [len(v) for v in other.merge_rule.task_deltas.values()] == [2, 2]
    assert other.num_parameters() == ctl.num_parameters()

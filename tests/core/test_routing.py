"""Routing (HAMConfig.routing) and data similarity (similarity_source='data') on a two-domain fixture."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from ham_lightning.core.config import HAMConfig
from ham_lightning.core.controller import inject
from ham_lightning.core.routing import PrefixRouter, Routes, bhattacharyya


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(stem=nn.Identity(), blocks=nn.Sequential(Block())))


def domain(name: str, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs of domain A (centred at +3 on the first half of the features) or B (+3 on the second half)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    x[:, slice(0, 4) if name == "A" else slice(4, 8)] += 3.0
    return x


def run_sequence(config: HAMConfig, domains: list[str]) -> tuple[nn.Module, object]:
    net = model()
    ham = inject(net, config)
    for t, name in enumerate(domains):
        data = domain(name, seed=t)
        ham.observe_task([data[:32], data[32:]], net)
        for layer in ham.layers.values():  # a "trained" adapter: a fixed random delta per task
            with torch.no_grad():
                layer.lora_B.copy_(torch.randn_like(layer.lora_B, generator=torch.Generator().manual_seed(t)))
        ham.end_task()
    return net, ham


def test_data_similarity_ranks_same_domain_tasks_above_cross_domain_ones() -> None:
    router = PrefixRouter(8, 4)
    means = []
    for t, name in enumerate(["A", "A", "B", "B"]):
        router.reset_task()
        x = domain(name, 256, seed=t)
        router.observe(x)
        means.append(router.task_sum / router.task_count)
        router.commit(t)
    precision = router.precision()
    same = [bhattacharyya(means[0], means[1], precision), bhattacharyya(means[2], means[3], precision)]
    cross = [bhattacharyya(means[i], means[j], precision) for i in (0, 1) for j in (2, 3)]
    assert min(same) > 0.9 and max(cross) < 0.01
    router.reset_task()
    router.observe(domain("B", 64, seed=9))
    sims = router.similarities([True, True, True, True])
    assert min(sims[2:]) > 0.9 > 0.01 > max(sims[:2])


def test_groups_follow_the_domains_and_routing_picks_the_right_group() -> None:
    config = HAMConfig(target_modules=["fc1", "fc2"], adapt_from="blocks.0", routing=True,
                       similarity_source="data", similarity_threshold=0.01, max_groups=4)
    net, ham = run_sequence(config, ["A", "B", "A", "B", "A"])
    assert ham.assignments == [0, 1, 0, 1, 0]
    assert [d.opened for d in ham.history] == [True, True, False, False, False]
    router = ham.router
    routes_a = router.route(domain("A", 200, seed=99))
    routes_b = router.route(domain("B", 200, seed=98))
    assert (routes_a == 0).float().mean() > 0.97 and (routes_b == 1).float().mean() > 0.97
    # The routed output of a domain-A input is the frozen layer plus group 0's delta alone.
    net.eval()
    x = domain("A", 8, seed=5)
    routed = net(x)
    assert (ham.layers["blocks.0.fc1"].route.slots == 0).all()
    ham.config.routing = False  # the paper's inference: every group on every input
    merged = net(x)
    ham.config.routing = True
    only_group0 = model()
    with torch.no_grad():
        for name, layer in ham.layers.items():
            B, A = layer.group_delta(0)
            only_group0.get_submodule(name).weight += layer.scaling * B @ A
    assert torch.allclose(routed, only_group0(x), atol=1e-5)
    assert not torch.allclose(routed, merged, atol=1e-3)


def test_training_runs_on_top_of_the_planned_group() -> None:
    config = HAMConfig(target_modules=["fc1", "fc2"], adapt_from="blocks.0", routing=True,
                       similarity_source="data", similarity_threshold=0.01)
    net, ham = run_sequence(config, ["A", "B"])
    ham.observe_task([domain("B", seed=7)], net)
    assert int(ham.router.planned) == 1
    net.train()
    net(domain("A", 4))  # even inputs that look like A train on top of the planned slot
    assert (ham.layers["blocks.0.fc2"].route.slots == 1).all()
    with pytest.raises(RuntimeError, match="routes each input to one group"):
        ham.fold()


def test_protect_ramp_sets_a_slots_first_energies_then_protect_inputs() -> None:
    """``protect_ramp``: after a slot's k-th task its subspace keeps ``protect_ramp[k-1]`` of the energy (counted
    per slot with scope ``group``), ``protect_inputs`` after the ramp."""
    config = HAMConfig(target_modules=["fc1", "fc2"], adapt_from="blocks.0", routing=True,
                       similarity_source="data", similarity_threshold=0.01, max_groups=4, protect_inputs=0.99,
                       protect_ramp=[0.5], protect_scope="group")
    net = model()
    ham = inject(net, config)
    space = ham.subspace
    assert space is not None
    expected = [0.5, 0.5, 0.99]  # the first task of slot 0, of slot 1, then slot 0's second
    for t, name in enumerate(["A", "B", "A"]):
        data = domain(name, seed=t)
        ham.reset_adapter(t)
        ham.observe_task([data[:32], data[32:]], net)
        ham.end_task()
        with ham.collecting_inputs(), torch.no_grad():
            net(data)
        ham.update_protection()
        kept = space.ranks()
        assert ham.config.protect_energy(sum(d.group == ham.history[-1].group for d in ham.history)) == expected[t]
        space.update(expected[t])  # the same moment at the expected energy: the same subspace
        assert space.ranks() == kept
        space.update(0.5 if expected[t] == 0.99 else 0.99)
        assert space.ranks()["blocks.0.fc1"] != kept["blocks.0.fc1"]  # the energy matters on this moment
        space.update(expected[t])
    assert [d.group for d in ham.history] == [0, 1, 0]
    with pytest.raises(ValueError, match="protect_ramp holds energy fractions"):
        HAMConfig(target_modules=["fc1"], protect_inputs=0.9, protect_ramp=[0.8, 1.0])
    with pytest.raises(ValueError, match="protect_inputs=0 disables"):
        HAMConfig(target_modules=["fc1"], protect_ramp=[0.8])


@pytest.mark.parametrize("conv", [False, True])
def test_a_batch_routed_to_one_slot_gets_that_slots_delta_fused_with_the_same_outputs_and_gradients(conv) -> None:
    """Training routes every input to the planned slot: its delta is fused into the frozen weight for the call
    (`Routes.whole`) instead of added per input; outputs and the adapter's gradients are those of the per-input
    sum (a strided 1x1 conv takes the conv path, a Linear the matmul one)."""
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(head=nn.Conv2d(6, 5, 1, stride=2) if conv else nn.Linear(6, 5)))
    ham = inject(net, HAMConfig(target_modules=["head"], rank=2, max_groups=3, group_rank=4))
    layer = ham.layers["head"]
    with torch.no_grad():
        for g in (0, 1):
            layer.set_slot(g, torch.randn(5, 4), torch.randn(4, 6))
        layer.lora_B.normal_()
        layer.group_scalars.fill_(0.7)
    x = torch.randn(4, 6, 5, 5) if conv else torch.randn(8, 6)
    outputs, grads = [], []
    for whole in (1, None):
        routes = Routes.of(torch.ones(x.shape[0], dtype=torch.long))
        layer.route = Routes(routes.slots, routes.members, whole)
        y = net(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append(layer.lora_B.grad.clone())
        layer.lora_B.grad = None
    routes = Routes.of(torch.ones(x.shape[0], dtype=torch.long))
    with torch.no_grad():
        layer.route = routes
        net(x)  # caches slot 1's fused weight
        layer.set_slot(1, torch.randn(5, 3), torch.randn(3, 6))  # a merge into the slot: the cache must not serve
        fused = net(x)
        layer.route = Routes(routes.slots, routes.members, None)
        torch.testing.assert_close(fused, net(x), rtol=1e-5, atol=1e-5)
    layer.route = None
    assert Routes.of(torch.ones(3, dtype=torch.long)).whole == 1
    assert Routes.of(torch.tensor([1, 0, 1])).whole is None and Routes.of(torch.tensor([-1, -1])).whole is None
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[0], net(x), atol=1e-3)  # unrouted: every slot's delta, not slot 1's


def test_routing_needs_adapt_from() -> None:
    with pytest.raises(ValueError, match="set adapt_from"):
        HAMConfig(target_modules=["fc1"], routing=True)


def test_group_scoped_protection_keeps_an_adapter_off_its_own_slots_inputs_only() -> None:
    """``protect_scope="group"``: each slot collects the inputs of the tasks that joined it, and a new adapter is
    projected off the subspace of the slot planned for it, not off other domains' (routing keeps those apart)."""
    config = HAMConfig(target_modules=["fc1", "fc2"], adapt_from="blocks.0", routing=True,
                       similarity_source="data", similarity_threshold=0.01, max_groups=4, protect_inputs=0.9,
                       protect_scope="group")
    net = model()
    ham = inject(net, config)
    space = ham.subspace
    assert space is not None and space.slots == 4
    for t, name in enumerate(["A", "B"]):
        data = domain(name, seed=t)
        ham.observe_task([data[:32], data[32:]], net)
        ham.protect_()
        ham.end_task()
        with ham.collecting_inputs(), torch.no_grad():
            net(data)
        ham.update_protection()
    fc1 = "blocks.0.fc1"
    moments = getattr(space, "moment__" + fc1.replace(".", "__"))
    assert moments.shape[0] == 4 and moments[0].any() and moments[1].any() and not moments[2:].any()
    ham.reset_adapter(2)
    data = domain("B", seed=7)
    ham.observe_task([data], net)
    assert int(ham.router.planned) == 1
    A = ham.layers[fc1].lora_A.detach().clone()
    ham.protect_()
    projected = ham.layers[fc1].lora_A.detach()
    P1 = getattr(space, "projector__" + fc1.replace(".", "__"))[1]
    assert not torch.equal(projected, A)
    torch.testing.assert_close(projected, A - A @ P1)  # slot 1's subspace (domain B), and only it
    with pytest.raises(ValueError, match="protect_scope='group'.*routing=True"):
        HAMConfig(target_modules=["fc1"], protect_inputs=0.9, protect_scope="group")

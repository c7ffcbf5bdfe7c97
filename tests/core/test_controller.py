import copy
import tempfile
import warnings

import pytest
import torch
from helpers import perturb, tiny_efficientnet, tiny_vit
from peft import PeftModel
from torch import nn

from ham_lightning import HAMConfig, HAMLayer, inject
from ham_lightning.core.export import export_peft, folded_state_dict

VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]


def _vit_ham(**cfg):
    torch.manual_seed(0)
    model = tiny_vit().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ham = inject(model, HAMConfig(target_modules=VIT_TARGETS, **cfg))
    return model, ham


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("granularity", ["adapter", "layer"])
def test_merge_without_pruning_leaves_outputs_unchanged(granularity):
    model, ham = _vit_ham(rank=4, max_groups=2, group_rank=64, prune="none", scalar_granularity=granularity)
    x = _x()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # tasks 2-4 join occupied groups
        perturb(ham, generator=g)
        before = model(x)
        decision = ham.end_task()
        assert torch.allclose(model(x), before, atol=1e-5), decision
    assert ham.num_groups == 2
    assert any(not d.opened for d in ham.history)


def test_merge_works_on_efficientnet_pointwise_convs():
    torch.manual_seed(0)
    model = tiny_efficientnet().double().eval()  # float64: a deep ReLU6 net amplifies float32 rounding
    ham = inject(model, HAMConfig(target_modules=["conv_pw", "conv_pwl", "conv_head"], rank=2, max_groups=2,
                                  group_rank=16, prune="none"))
    assert len(ham.layers) == 32 and all(layer.is_conv for layer in ham.layers.values())
    x = _x().double()
    for _ in range(3):
        perturb(ham, 0.05, torch.Generator().manual_seed(len(ham.history)))
        before = model(x)
        ham.end_task()
        assert torch.allclose(model(x), before, atol=1e-9)
    ham.fold()
    assert torch.allclose(model(x), before, atol=1e-9)


def test_fold_is_exact_and_costs_the_bare_backbone():
    model, ham = _vit_ham(rank=4, max_groups=2, group_rank=8)
    bare = tiny_vit()
    x = _x()
    for t in range(3):
        perturb(ham, generator=torch.Generator().manual_seed(t))
        ham.end_task()
    perturb(ham, generator=torch.Generator().manual_seed(9))  # mid-task: the active adapter is folded too
    y = model(x)
    ham.fold()
    assert torch.allclose(model(x), y, atol=1e-5)
    assert not any(isinstance(m, HAMLayer) for m in model.modules())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in bare.state_dict().items()}
    assert not any("ham_state" in k for k in model.state_dict())  # the state module left with the HAM layer
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in bare.parameters())
    with pytest.raises(RuntimeError, match="unfold"):
        ham.end_task()
    ham.unfold()
    assert isinstance(model.blocks[0].attn.qkv, HAMLayer)
    assert model.get_submodule(ham.state_name).merge_rule is ham.merge_rule
    assert len(model.state_dict()[f"{ham.state_name}._extra_state"]["history"]) == 3
    assert torch.allclose(model(x), y, atol=1e-6)
    # training continues: gradients reach the active adapter
    model(x).sum().backward()
    assert model.blocks[0].attn.qkv.lora_B.grad is not None


def test_groups_never_exceed_max_and_memory_is_flat():
    model, ham = _vit_ham(rank=2, max_groups=3, group_rank=4, prune="magnitude", density=0.5)
    counts = []
    for t in range(30):
        perturb(ham, generator=torch.Generator().manual_seed(t))
        ham.end_task()
        assert ham.num_groups <= 3
        if t + 1 in (3, 30):
            counts.append((ham.num_parameters(), sum(b.numel() for b in model.buffers())))
        assert max(d for d in ham.history[-1].group_ranks) <= 4
    assert counts[0] == counts[1]
    assert ham.num_groups == 3


def test_similarity_threshold_joins_similar_task():
    model, ham = _vit_ham(rank=2, max_groups=4, group_rank=8, similarity_threshold=0.5, prune="none")
    perturb(ham, generator=torch.Generator().manual_seed(0))
    snapshot = [(layer.lora_A.clone(), layer.lora_B.clone()) for layer in ham.layers.values()]
    first = ham.end_task()
    with torch.no_grad():  # the same delta again: cosine 1 > tau, so it joins group 0 although slots are free
        for layer, (A, B) in zip(ham.layers.values(), snapshot):
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    second = ham.end_task()
    assert first.opened and first.group == 0
    assert not second.opened and second.group == 0
    assert second.similarities[0] == pytest.approx(1.0, abs=1e-5)


def test_task_joins_most_similar_group_when_full():
    model, ham = _vit_ham(rank=2, max_groups=2, group_rank=16, prune="none")
    deltas = []
    for t in range(2):
        perturb(ham, generator=torch.Generator().manual_seed(t))
        deltas.append([(layer.lora_A.clone(), layer.lora_B.clone()) for layer in ham.layers.values()])
        ham.end_task()
    with torch.no_grad():  # a copy of task 1's adapter: most similar to group 1
        for layer, (A, B) in zip(ham.layers.values(), deltas[1]):
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    decision = ham.end_task()
    assert decision.group == 1 and not decision.opened
    assert decision.similarities[1] > decision.similarities[0]


def test_reset_gives_identity_adapter_and_is_seeded():
    model, ham = _vit_ham(rank=2)
    x = _x()
    bare = copy.deepcopy(model)
    ham_bare = bare.ham_controller
    ham_bare.fold()
    assert torch.allclose(model(x), bare(x), atol=1e-6)  # B = 0 at start: the adapter starts as identity
    _, ham2 = _vit_ham(rank=2)
    for a, b in zip(ham.layers.values(), ham2.layers.values()):
        assert torch.equal(a.lora_A, b.lora_A)


def test_state_dict_round_trip():
    model, ham = _vit_ham(rank=2, max_groups=2, group_rank=4)
    for t in range(3):
        perturb(ham, generator=torch.Generator().manual_seed(t))
        ham.end_task()
    state = ham.state_dict()
    model2, ham2 = _vit_ham(rank=2, max_groups=2, group_rank=4)
    ham2.load_state_dict(state)
    x = _x()
    assert torch.equal(model(x), model2(x))
    assert ham2.assignments == ham.assignments
    perturb(ham, generator=torch.Generator().manual_seed(5))
    perturb(ham2, generator=torch.Generator().manual_seed(5))
    assert ham.end_task() == ham2.end_task()
    # the model's own state dict carries the slots too (what Lightning checkpoints hold)
    model3, ham3 = _vit_ham(rank=2, max_groups=2, group_rank=4)
    model3.load_state_dict(model.state_dict())
    assert torch.equal(model3(x), model(x))
    assert ham3.num_groups == ham.num_groups
    assert ham3.history == ham.history  # the merge history is model state too (ham_state._extra_state)


def test_peft_export_reproduces_outputs():
    model, ham = _vit_ham(rank=3, max_groups=2, group_rank=6)
    bare_state = folded_state_dict(ham)  # nothing trained yet: W0 itself
    for t in range(3):
        perturb(ham, generator=torch.Generator().manual_seed(t))
        ham.end_task()
    x = _x()
    y = model(x)
    with tempfile.TemporaryDirectory() as d:
        export_peft(ham, d)
        plain = tiny_vit().eval()
        plain.load_state_dict(bare_state)
        peft_model = PeftModel.from_pretrained(plain, d).eval()
        assert torch.allclose(peft_model(x), y, atol=1e-5)
    folded = tiny_vit().eval()
    folded.load_state_dict(folded_state_dict(ham))
    assert torch.allclose(folded(x), y, atol=1e-5)


def test_unknown_target_lists_candidates():
    with pytest.raises(ValueError, match=r"match no module.*\['fc1', 'fc2', 'proj', 'qkv'\]"):
        inject(tiny_vit(), HAMConfig(target_modules=["qkv", "query"]))
    with pytest.raises(ValueError, match="matches no adaptable module"):
        inject(tiny_vit(), HAMConfig(target_modules=r".*\.nothing"))


def test_patch_embed_conv_is_never_adapted_silently():
    model = tiny_vit()
    with pytest.warns(UserWarning, match="patch_embed.proj"):
        ham = inject(model, HAMConfig(target_modules=["proj"]))
    assert list(ham.layers) == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    ham2 = inject(tiny_vit(), HAMConfig(target_modules=r"blocks\.\d+\.mlp\.fc\d"))  # regex: PEFT full match
    assert len(ham2.layers) == 4


def test_inject_freezes_backbone_and_rejects_double_injection():
    model, ham = _vit_ham()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "importance" in n or "group_scalars" in n for n in trainable)
    with pytest.raises(ValueError, match="already has HAM layers"):
        inject(model, HAMConfig(target_modules=VIT_TARGETS))


@pytest.mark.parametrize("bad, message", [
    (dict(max_groups=0), "max_groups must be >= 1"),
    (dict(density=0.0), r"density must be in \(0, 1\]"),
    (dict(density=1.5), r"density must be in \(0, 1\]"),
    (dict(rank=8, group_rank=4), "group_rank"),
    (dict(prune="random"), "prune must be one of"),
])
def test_bad_config_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        HAMConfig(**bad)


def test_groups_run_in_one_batched_product():
    model, ham = _vit_ham(rank=2, max_groups=3, group_rank=4, prune="none")
    for t in range(3):
        perturb(ham, generator=torch.Generator().manual_seed(t))
        ham.end_task()
    layer = ham.layers["blocks.0.mlp.fc1"]
    A, B, scale = layer._low_rank_weights()
    assert A.shape == (layer._active_group_rank * 3 + 2, layer.in_features)
    x = torch.randn(5, layer.in_features)
    expected = layer.base(x) + layer.scaling * sum(
        layer.group_scalars[g] * (x @ layer.slot_factors(g)[1].T @ layer.slot_factors(g)[0].T) for g in range(3)
    ) + layer.scaling * layer.importance * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_empty_slots_still_get_gradients():
    model, ham = _vit_ham(rank=2, max_groups=3, train_group_scalars=True)
    model(_x()).sum().backward()
    for p in ham.scalar_parameters():
        assert p.grad is not None
    assert isinstance(model, nn.Module)


def test_inject_leaves_the_module_tree_of_a_sequential_as_it_was():
    """The controller's state lives under a HAM layer, not as a new child that a Sequential would run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    names = [n for n, _ in model.named_children()]
    ham = inject(model, HAMConfig(target_modules=["0", "2"], rank=2, max_groups=1, group_rank=4))
    assert [n for n, _ in model.named_children()] == names and ham.state_name == "0.ham_state"
    x = torch.randn(3, 6)
    perturb(ham, generator=torch.Generator().manual_seed(0))
    y = model(x)
    assert y.shape == (3, 4)
    ham.end_task()
    assert f"{ham.state_name}._extra_state" in model.state_dict()

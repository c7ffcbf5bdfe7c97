"""The one registry shape (merge rules, heads, readers), and every registered entry against its contract."""

from __future__ import annotations

import pytest
import torch
from toy import MLPBackbone

import ham_lightning as hl
from ham_lightning.core import registry
from ham_lightning.core.head import Head, create_head
from ham_lightning.core.merge_rules import MergeDecision, MergeRule, create_merge_rule
from ham_lightning.core.registry import HEADS, MERGE_RULES, Registry
from ham_lightning.data.readers import READERS, DatasetReader, build_reader


def test_register_create_list_and_duplicates_refused() -> None:
    things: Registry[type] = Registry("thing", how="things.register('name', cls)")
    assert things.register("a", dict) is dict and things.register("a", dict) is dict  # the same object again: fine
    with pytest.raises(ValueError, match=r"a thing named 'a' is already registered \(builtins.dict\); choose another "
                                         r"name, or unregister\('a'\) first"):
        things.register("a", list)

    @things.register("b")
    class B:
        def __init__(self, x: int) -> None:
            self.x = x

    assert things.names() == ["a", "b"] and list(things) == ["a", "b"] and len(things) == 2 and "b" in things
    assert things.create("b", 3).x == 3 and things["a"] is dict
    with pytest.raises(ValueError, match=r"--opt: unknown thing 'c'; registered: a, b \(a new one: things.register"):
        things.check("c", "--opt")
    assert things.unregister("a") is dict and things.names() == ["b"]
    with pytest.raises(ValueError, match="name"):
        things.register("", int)


def test_the_three_registries_have_their_built_ins() -> None:
    from ham_lightning.core.config import METHODS

    assert set(METHODS) <= set(MERGE_RULES.names())  # other test modules register their own too
    assert {"linear", "cosine", "ncm", "ridge", "aligned"} <= set(HEADS.names())
    assert {"digits", "cifar100", "imagenet_r", "cub200", "tiny_imagenet", "image_folder"} <= set(READERS.names())


def test_plugins_are_imported_from_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    good = EntryPoint(name="good", value="json", group=registry.PLUGIN_GROUP)
    bad = EntryPoint(name="bad", value="no_such_module_here", group=registry.PLUGIN_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [good] if group else [])
    assert registry.load_plugins() == ["good"]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [bad])
    with pytest.raises(ImportError, match="plug-in 'bad' .* failed to import.*Fix or uninstall"):
        registry.load_plugins()


# ---- every registered entry against its contract ----------------------------------------------------------------
@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_follows_the_head_contract(name: str) -> None:
    head = create_head(name, 8, 6, mask="current", freeze_old_rows=True, scale=16.0)
    assert isinstance(head, Head)
    torch.manual_seed(0)
    features, labels = torch.randn(40, 8), torch.randint(0, 3, (40,))
    for task, classes in enumerate(([0, 1, 2], [3, 4, 5])):
        head.start_task(classes)
        assert head.current.nonzero().flatten().tolist() == classes
        assert head.seen.nonzero().flatten().tolist() == list(range(3 * (task + 1)))
        head.end_task()
        if head.needs_statistics:
            head.update(features, labels + 3 * task)
            head.fit()
    logits = head(features)
    assert logits.shape == (40, 6)
    masked = head.eval_logits(logits)
    assert torch.isfinite(masked[:, :6]).any(dim=1).all()  # every row has a prediction among the seen classes
    assert torch.isinf(head.train_logits(logits)[:, :3]).all()  # training: the current task's classes only


@pytest.mark.parametrize("name", MERGE_RULES.names())
def test_every_merge_rule_runs_a_boundary_and_keeps_its_state(name: str) -> None:
    rule = create_merge_rule(name)
    assert isinstance(rule, MergeRule) and rule.name == name
    torch.manual_seed(0)
    ctl = hl.inject(MLPBackbone(), hl.HAMConfig(target_modules=["fc1", "fc2"], rank=2, max_groups=2, method=name))
    with torch.no_grad():
        for layer in ctl.layers.values():
            layer.lora_B.normal_()
    decision = ctl.end_task()
    assert isinstance(decision, MergeDecision) and decision.task == 0 and ctl.history == [decision]
    counts = ctl.num_parameters()
    assert counts["trainable"] > 0 and counts["adapter_stored"] >= counts["trainable"]
    state = ctl.model.state_dict()
    fresh = hl.inject(MLPBackbone(), hl.HAMConfig(target_modules=["fc1", "fc2"], rank=2, max_groups=2, method=name))
    fresh.model.load_state_dict(state)  # strict: the rule's state has the same keys
    assert fresh.history == ctl.history


@pytest.mark.parametrize("name", READERS.names())
def test_every_reader_is_a_named_dataset_reader(name: str, tmp_path) -> None:
    reader = READERS[name]
    assert issubclass(reader, DatasetReader) and reader.name == name and reader.layout
    try:  # built without its data: it either reads (an embedded set) or says what it needs
        built = build_reader(name, tmp_path / "absent" if reader.needs_root else None)
    except (FileNotFoundError, ValueError) as error:
        assert "absent" in str(error) or "needs" in str(error)  # names the missing root, or what it needs
        return
    assert not reader.needs_root and len(built.load("test").labels) > 0

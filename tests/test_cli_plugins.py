"""Extension points from the command line: a merge rule and a head registered by a user's code (here this test
module) are selected with ``--model.ham.method`` and ``--model.head`` and run a 2-task fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import offline_wandb
from test_cli import TINY

from ham_lightning.cli import cli
from ham_lightning.core.heads import NCMHead, register_head
from ham_lightning.core.merge_rules import MergeDecision, MergeTarget, SequentialLoRA, register_merge_rule
from ham_lightning.core.registry import HEADS, MERGE_RULES


@register_merge_rule("test_counting_rule")
class CountingRule(SequentialLoRA):
    """seq_lora that counts its boundaries in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("boundaries", torch.zeros((), dtype=torch.long))

    def end_task(self, controller: MergeTarget) -> MergeDecision:
        self.boundaries += 1
        return super().end_task(controller)


class CountingNCM(NCMHead):
    """An NCM head that counts its fits."""

    fits = 0

    def fit(self) -> None:
        type(self).fits += 1


register_head("test_counting_ncm", lambda d, c, mask=None, freeze_old_rows=None, scale=16.0, **kw: CountingNCM(d, c))


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline_wandb(monkeypatch, tmp_path)


def test_a_registered_rule_and_head_run_from_the_command_line(tmp_path: Path) -> None:
    CountingNCM.fits = 0
    built = cli(["fit", *TINY, "--data.num_tasks=2", "--model.ham.method=test_counting_rule",
                 "--model.head=test_counting_ncm", "--run_name=plugins", f"--runs_dir={tmp_path}"])
    model = built.model
    assert isinstance(model.ham.merge_rule, CountingRule) and int(model.ham.merge_rule.boundaries) == 2
    assert isinstance(model.head, CountingNCM) and CountingNCM.fits == 2  # one statistics pass per boundary
    results = json.loads((tmp_path / "plugins" / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2 and results["config"]["model"]["ham"]["method"] == "test_counting_rule"


@pytest.mark.parametrize(("option", "shown"), [
    ("--model.ham.method=nope", r"method must be one of .*test_counting_rule.*got 'nope'"),
    ("--model.head=nope", r"--model.head: unknown head 'nope'; registered: .*test_counting_ncm"),
    ("--data.dataset=nope", r"--data.dataset: unknown dataset 'nope'; registered: .*digits"),
])
def test_an_unregistered_name_is_refused_before_anything_is_built(
        option: str, shown: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["fit", *TINY, option, f"--runs_dir={tmp_path}"])
    import re

    assert re.search(shown, capsys.readouterr().err.replace("\n", " "))
    assert "test_counting_rule" in MERGE_RULES and "test_counting_ncm" in HEADS

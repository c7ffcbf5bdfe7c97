"""All of HAM on a user's own LightningModule (``hl.inject`` + the callback): input protection, statistics heads,
the `TaskAware` hooks, and the errors that name what a module must change."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

import ham_lightning as hl


class PlainModule(pl.LightningModule, hl.TaskAware):
    """A user's module: an MLP backbone with HAM, a trained head, optionally a ridge head that predicts."""

    def __init__(self, protect_inputs: float = 0.0, ridge: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(3 * 16 * 16, 128),
                                                  act=nn.GELU(), fc2=nn.Linear(128, 64)))
        self.ham = hl.inject(self.backbone, hl.HAMConfig(target_modules=["fc1", "fc2"], rank=4, max_groups=2,
                                                         protect_inputs=protect_inputs))
        self.train_head = hl.IncrementalHead(64, num_classes, kind="cosine")
        self.head = hl.RidgeHead(64, num_classes, projection=256) if ridge else None
        self.events: list[tuple[str, int]] = []
        self.snapshots: dict[int, Tensor] = {}
        self.probe: Tensor | None = None

    def on_task_start(self, task: int, classes: Sequence[int]) -> None:
        self.events.append(("start", task))

    def on_before_merge(self, task: int) -> None:
        self.events.append(("before_merge", task))
        assert len(self.ham.history) == task  # not merged yet

    def on_after_merge(self, task: int) -> None:
        self.events.append(("after_merge", task))
        assert len(self.ham.history) == task + 1
        if self.probe is not None:
            with torch.no_grad():
                self.snapshots[task] = self.backbone(self.probe).clone()

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        return self.head(features) if self.head is not None else self.train_head(features)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.train_head.train_logits(self.train_head(self.backbone(x))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)


def run(module: pl.LightningModule, num_tasks: int = 5) -> dict:
    pl.seed_everything(0, verbose=False)
    data = hl.ClassIncrementalDataModule(dataset="digits", num_tasks=num_tasks, image_size=16, batch_size=32)
    if isinstance(module, PlainModule):
        data.setup("fit")
        data.set_task(0)
        module.probe = next(iter(data.test_dataloader()[0]))[0][:64]  # task 0's test images
    merge = hl.HierarchicalMergeCallback()
    for _ in range(num_tasks):
        pl.Trainer(max_epochs=2, callbacks=[merge], logger=False, enable_checkpointing=False, accelerator="cpu",
                   enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    return merge.results()


def drift(module: PlainModule) -> float:
    """Relative change of task 0's features from the end of task 0 to the end of the sequence."""
    first, last = module.snapshots[0], module.snapshots[max(module.snapshots)]
    return float((last - first).norm() / first.norm())


def test_protect_inputs_on_a_plain_module_keeps_old_features_still() -> None:
    """``HAMConfig(protect_inputs=0.99)`` through ``hl.inject`` alone: the controller builds the subspace, the
    callback keeps adapters off it, and task 0's features move several times less than without."""
    free, kept = PlainModule(protect_inputs=0.0), PlainModule(protect_inputs=0.99)
    run(free)
    run(kept)
    assert free.ham.subspace is None
    assert kept.ham.subspace is not None and all(k > 0 for k in kept.ham.subspace.ranks().values())
    moved, protected = drift(free), drift(kept)
    print(f"task-0 feature drift: {moved:.4f} unprotected, {protected:.4f} with protect_inputs=0.99")
    assert protected < 0.5 * moved, (protected, moved)
    assert kept.events[:4] == [("start", 0), ("before_merge", 0), ("after_merge", 0), ("start", 1)]


def test_a_ridge_head_on_a_plain_module_is_fitted_by_the_callback() -> None:
    module = PlainModule(protect_inputs=0.99, ridge=True)
    results = run(module)
    head = module.head
    assert head is not None and head.seen.all() and head.current.sum() == 2  # the callback named each task's classes
    assert not torch.isnan(head.lam) and head.weight.abs().sum() > 0  # fitted after each merge
    assert int(head.count) > 1000  # the digits' training images, each seen once per statistics pass
    matrix = results["accuracy_matrix"]
    print("ridge head on a plain module:", [round(v, 1) for v in matrix[-1]])
    # Each task is learned (chance: 50% down to 10%); old tasks are not kept here: this random MLP's adapters move
    # the features under the ridge statistics (a frozen one ends at 86%, see docs/method.md on drift).
    assert len(matrix) == 5 and all(matrix[t][t] > 75 for t in range(5))


class NotDeclared(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
        self.ham = hl.inject(self.backbone, hl.HAMConfig(target_modules=["1"], rank=2, max_groups=2))

    def on_task_start(self, task: int, classes: Sequence[int]) -> None:  # would never be called
        pass

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.backbone(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_task_hooks_without_task_aware_are_refused() -> None:
    with pytest.raises(MisconfigurationException, match=r"defines on_task_start but is not a ham_lightning.TaskAware.*"
                                                         r"class NotDeclared\(LightningModule, ham_lightning.TaskAware\)"):
        run(NotDeclared(), num_tasks=2)


class ForwardSkipsHead(PlainModule):
    def forward(self, x: Tensor) -> Tensor:
        return self.train_head(self.backbone(x))


def test_a_statistics_head_that_forward_never_calls_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match=r"RidgeHead got no features in the statistics pass: "
                                                         r"ForwardSkipsHead.forward\(x\) never called it"):
        run(ForwardSkipsHead(ridge=True), num_tasks=2)

"""Add HAM to an existing Lightning project: three changes to your own LightningModule and Trainer.

Your project already has a LightningModule (here `LitClassifier`: a timm backbone + a linear head) and a
datamodule. To learn a class-incremental sequence with HAM:

1. ``ham_lightning.inject(self.backbone, HAMConfig(...))`` in ``__init__`` (adapters, group slots, frozen backbone);
2. optionally the hooks of `ham_lightning.TaskAware` (inherit it), e.g. ``on_task_start(task, classes)`` to know
   the current task's classes -- here used to mask the loss to the current task's logits;
3. ``HierarchicalMergeCallback()`` in the Trainer's callbacks, and a datamodule that implements
   `ham_lightning.TaskProtocol` (`ClassIncrementalDataModule` does; so can yours).

Runs on CPU with a tiny randomly initialised MLP on the digits data set shipped with scikit-learn (about a
minute on a loaded 2-core CPU): ``python examples/add_ham_to_existing_project.py``. Measured with the defaults
(2 epochs per task): accuracy on each task right after training it, among all digits seen so far, 100.0 84.7 32.9
22.5 37.5% (chance 50 25 16.7 12.5 10%); 47.1% on all 10 digits after the 5 tasks (chance 10%). Before (a plain
linear head, lr 1e-2 for all): 1-6% on tasks 1-4 right after training them, 18.1% at the end.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ham_lightning as hl


class LitClassifier(pl.LightningModule, hl.TaskAware):
    """A plain image classifier, as it might already exist in your project."""

    def __init__(self, num_classes: int, lr: float = 1e-3, head_lr: float = 1e-2) -> None:
        super().__init__()
        # Any nn.Module works; a timm ViT would take target_modules=["qkv", "fc1", "fc2"] the same way.
        self.backbone = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(3 * 16 * 16, 256),
                                                  act=nn.GELU(), fc2=nn.Linear(256, 128)))
        # A cosine head (normalised features and rows): the rows of a new task, trained for a few steps, score on
        # the same scale as the older, longer-trained ones. With a plain nn.Linear (and one lr of 1e-2 for all)
        # tasks 1-4 scored 1-6% right after training them: the old rows won everywhere.
        self.head = nn.Linear(128, num_classes, bias=False)
        self.scale = 16.0
        self.lr, self.head_lr = lr, head_lr
        # (1) HAM: LoRA adapters + group slots in fc1 and fc2, the rest of the backbone frozen.
        self.ham = hl.inject(self.backbone, hl.HAMConfig(target_modules=["fc1", "fc2"], rank=4, max_groups=2))
        self.register_buffer("current", torch.zeros(num_classes, dtype=torch.bool))

    # (2) Optional (TaskAware): the callback tells the module which classes the new task has.
    def on_task_start(self, task: int, classes: Sequence[int]) -> None:
        self.current.zero_()
        self.current[list(classes)] = True

    def forward(self, x: Tensor) -> Tensor:
        features = F.normalize(self.backbone(x), dim=-1)
        return self.scale * F.linear(features, F.normalize(self.head.weight, dim=-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).masked_fill(~self.current, float("-inf")), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        # The adapters (and HAM's scalars) at a LoRA learning rate, the head faster; no weight decay, which would
        # shrink the rows of finished tasks while they get no gradient.
        head = list(self.head.parameters())
        adapters = [p for p in self.parameters() if p.requires_grad and all(p is not h for h in head)]
        return torch.optim.AdamW([{"params": adapters, "lr": self.lr}, {"params": head, "lr": self.head_lr}],
                                 weight_decay=0.0)


def main(epochs_per_task: int = 2) -> dict[str, Any]:
    """Train the digits sequence (5 tasks of 2 classes) with one ``trainer.fit`` per task; return the results."""
    pl.seed_everything(0, verbose=False)
    data = hl.ClassIncrementalDataModule(dataset="digits", num_tasks=5, batch_size=32, image_size=16)
    model = LitClassifier(num_classes=data.num_classes)
    merge = hl.HierarchicalMergeCallback()  # (3) one instance for the whole sequence: it holds its state
    for _ in range(data.num_tasks):
        trainer = pl.Trainer(max_epochs=epochs_per_task, callbacks=[merge], accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=data)
    results = merge.results()
    matrix = results["accuracy_matrix"]
    print("accuracy on each task right after training it (among all digits seen so far): "
          + " ".join(f"{matrix[t][t]:.1f}%" for t in range(len(matrix))))
    print(f"accuracy on all 10 digits after 5 tasks: {results['last_accuracy']:.1f}% (chance: 10%) "
          f"(forgetting {results['forgetting']:.1f}); task -> group: {results['groups']['assignment']}")
    model.ham.fold()  # zero-cost inference: the merged adapters written into the backbone's weights
    return results


if __name__ == "__main__":
    main()

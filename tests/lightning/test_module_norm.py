"""HAMModule over a whole sequence: BatchNorm statistics never move, and the PEFT export matches on the pristine base."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel
from torch import nn
from toy import ToyTaskData, quiet_trainer

import ham_lightning


class BNBackbone(nn.Module):
    """``fc1 -> BatchNorm1d -> GELU -> fc2``: an adaptable MLP with running statistics."""

    def __init__(self, in_features: int = 24, hidden: int = 32, num_features: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_features)
        self.num_features = num_features
        with torch.no_grad():  # non-trivial statistics, as a pretrained model has
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn(self.fc1(x))))


def test_batchnorm_frozen_over_a_sequence_and_peft_export_matches_pristine_base(tmp_path):
    torch.manual_seed(0)
    backbone = BNBackbone()
    pristine = copy.deepcopy(backbone)
    config = ham_lightning.HAMConfig(target_modules=["fc1", "fc2"], rank=4, max_groups=2, group_rank=8)
    model = ham_lightning.HAMModule(backbone, num_classes=6, ham=config,
                                    optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    data = ToyTaskData(num_tasks=3, epochs_per_task=2)
    merge = ham_lightning.HierarchicalMergeCallback()
    quiet_trainer(max_epochs=6, reload_dataloaders_every_n_epochs=1, callbacks=[merge]).fit(model, data)
    assert merge.current_task == 3
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.backbone.bn, key), getattr(pristine.bn, key)), key
    model.eval()
    x = torch.randn(10, 24)
    with torch.no_grad():
        expected = model.backbone(x)
        assert model.ham.num_groups >= 1 and not torch.allclose(expected, pristine.eval()(x), atol=1e-3)
        path = model.export_peft(tmp_path / "adapter")
        restored = PeftModel.from_pretrained(copy.deepcopy(pristine), str(path)).eval()
        torch.testing.assert_close(restored(x), expected, atol=1e-4, rtol=1e-4)

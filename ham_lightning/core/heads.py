"""`IncrementalHead`: one linear classifier over every class of the scenario, grown task by task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

LogitMask = Literal["current", "seen"]
HeadKind = Literal["linear", "cosine"]


class IncrementalHead(nn.Module):
    """A linear head allocated up front for all classes, with per-task logit masking and frozen finished rows.

    ``kind="linear"`` is design.md's masked linear head; ``kind="cosine"`` compares normalised features and rows
    (``scale`` times the cosine), which keeps the logits of old and new tasks on one scale. Rows of finished tasks
    are served from buffers (``frozen_weight``), so no optimizer, weight decay or momentum
    can move them (design.md: ``freeze_old_rows``). The trainable ``weight`` keeps its shape across tasks.
    """

    def __init__(self, in_features: int, num_classes: int, mask: LogitMask = "current", freeze_old_rows: bool = True,
                 kind: HeadKind = "linear", scale: float = 16.0):
        super().__init__()
        if mask not in ("current", "seen"):
            raise ValueError(f"mask must be 'current' or 'seen', got {mask!r}")
        if kind not in ("linear", "cosine"):
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        self.linear = nn.Linear(in_features, num_classes, bias=kind == "linear")
        self.mask, self.freeze_old_rows, self.kind, self.scale = mask, freeze_old_rows, kind, scale
        self.register_buffer("frozen_weight", torch.zeros(num_classes, in_features))
        self.register_buffer("frozen_bias", torch.zeros(num_classes))
        self.register_buffer("frozen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("current", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    def start_task(self, classes: Sequence[int]) -> None:
        """Classes of the task about to train: they become current and seen."""
        index = torch.as_tensor(list(classes), dtype=torch.long, device=self.current.device)
        if index.numel() and (index.min() < 0 or index.max() >= self.num_classes):
            raise ValueError(f"task classes {list(classes)} out of range for a head of {self.num_classes} classes")
        self.current.zero_()
        self.current[index] = True
        self.seen[index] = True

    @torch.no_grad()
    def end_task(self) -> None:
        """Freeze the current task's rows (when ``freeze_old_rows``)."""
        if self.freeze_old_rows:
            rows = self.current
            self.frozen_weight[rows] = self.linear.weight[rows].to(self.frozen_weight.dtype)
            if self.linear.bias is not None:
                self.frozen_bias[rows] = self.linear.bias[rows].to(self.frozen_bias.dtype)
            self.frozen |= rows

    def forward(self, features: Tensor) -> Tensor:
        """Logits over all classes (unmasked). ``cosine``: ``scale * cos(feature, row)``, so rows trained in
        different tasks give logits on one scale (less bias towards the newest classes)."""
        weight = torch.where(self.frozen[:, None], self.frozen_weight.to(self.linear.weight.dtype), self.linear.weight)
        if self.kind == "cosine":
            return self.scale * nn.functional.linear(nn.functional.normalize(features, dim=-1),
                                                     nn.functional.normalize(weight, dim=-1))
        bias = torch.where(self.frozen, self.frozen_bias.to(self.linear.bias.dtype), self.linear.bias)
        return nn.functional.linear(features, weight, bias)

    def train_logits(self, logits: Tensor) -> Tensor:
        """Logits masked for training: only the current task's (``current``) or all seen classes (``seen``)."""
        allowed = self.current if self.mask == "current" else self.seen
        return logits.masked_fill(~allowed, float("-inf"))

    def eval_logits(self, logits: Tensor) -> Tensor:
        """Logits masked to every class seen so far (task-agnostic evaluation)."""
        return logits.masked_fill(~self.seen, float("-inf"))

"""`ClassGaussians`: per-class Gaussian statistics of the features (means, a pooled or per-class diagonal
covariance), accumulated task by task, and features drawn from them for classes whose images are gone.

Two users: `AlignedHead` fits a classifier on draws of every seen class (SLCA's classifier alignment), and
`HAMModule(pseudo_features=...)` adds draws of earlier classes to each training batch, so a new adapter learns its
classes against the ones they will be compared with (issue 22, item 4; PASS-style prototype augmentation).
It is a `StatisticsHead` so the sequence driver's statistics pass feeds it the features its forward is called on
(after each merge, under the model that will predict); its ``forward`` returns the features unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ham_lightning.core.head import StatisticsHead

Covariance = Literal["shared", "diagonal"]


class ClassGaussians(StatisticsHead):
    """Per class: the feature sum, sum of squares and count; over all samples the sum of outer products, so the
    pooled within-class covariance is exact whatever the task split. ``covariance="shared"`` draws every class
    with that pooled covariance; ``"diagonal"`` with the class's own variances. A full covariance per class would
    be ``classes x dim^2`` numbers (1.3 GB for 200 x 1280 in float32). ``shrinkage`` pulls the covariance towards
    its mean variance so it factorises. ``clip=True`` clips every draw to the range each feature took in the
    statistics (a Gaussian draws negative values where, after a ReLU, no real feature is: a classifier could then
    tell draws from real features by that alone)."""

    def __init__(self, in_features: int, num_classes: int, covariance: Covariance = "shared",
                 shrinkage: float = 1e-3, clip: bool = False) -> None:
        super().__init__(in_features, num_classes)
        if covariance not in ("shared", "diagonal"):
            raise ValueError(f"covariance must be 'shared' or 'diagonal', got {covariance!r}")
        self.covariance, self.shrinkage, self.clip = covariance, shrinkage, clip
        self.register_buffer("class_sum", torch.zeros(num_classes, in_features, dtype=torch.float64))
        self.register_buffer("class_sq", torch.zeros(num_classes, in_features, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("outer", torch.zeros(in_features, in_features, dtype=torch.float64))
        self.register_buffer("low", torch.full((in_features,), float("inf"), dtype=torch.float64))
        self.register_buffer("high", torch.full((in_features,), float("-inf"), dtype=torch.float64))
        self._factor: tuple[int, Tensor] | None = None  # (outer's version, Cholesky factor of the pooled covariance)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        f = features.double()
        self.class_sum.index_add_(0, labels, f)
        self.class_sq.index_add_(0, labels, f * f)
        self.class_count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.outer.add_(f.T @ f)
        if len(f):
            torch.minimum(self.low, f.min(0).values, out=self.low)
            torch.maximum(self.high, f.max(0).values, out=self.high)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint from before the range was kept: no range known, so draws are not clipped.
        for name in ("low", "high"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit(self) -> None:
        """The statistics are the sums: nothing to solve (the covariance factor is computed when first drawn)."""

    def forward(self, features: Tensor) -> Tensor:
        return features

    @property
    def known(self) -> Tensor:
        """Classes with statistics (boolean over every class)."""
        return self.class_count > 0

    def means(self) -> Tensor:
        return self.class_sum / self.class_count.clamp_min(1.0)[:, None]

    def pooled_covariance(self) -> Tensor:
        """Within-class covariance pooled over the seen classes (float64), shrunk towards its mean variance."""
        counts = self.class_count
        seen = counts > 0
        n, k = float(counts.sum()), int(seen.sum())
        means = self.means()[seen]
        scatter = self.outer - (means.T * counts[seen]) @ means
        cov = scatter / max(n - k, 1.0)
        return cov + self.shrinkage * float(cov.diagonal().mean().clamp_min(1e-12)) * torch.eye(
            cov.shape[0], dtype=cov.dtype, device=cov.device)

    def _cholesky(self) -> Tensor:
        version = self.outer._version
        if self._factor is None or self._factor[0] != version:
            self._factor = (version, torch.linalg.cholesky(self.pooled_covariance().cpu()))
        return self._factor[1]

    def draw(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """One feature per entry of ``labels`` (classes with statistics), from ``N(mean_c, cov_c)``; float32, on
        the CPU (``generator`` is a CPU generator: the same draws on every device)."""
        labels = labels.cpu()
        means = self.means().cpu()[labels]
        z = torch.randn(len(labels), self.in_features, generator=generator, dtype=torch.float64)
        if self.covariance == "shared":
            noise = z @ self._cholesky().T
        else:
            classes, index = torch.unique(labels, return_inverse=True)
            count = self.class_count.cpu()[classes].clamp_min(1.0)[:, None]
            var = (self.class_sq.cpu()[classes] / count - self.means().cpu()[classes] ** 2).clamp_min(0.0)
            noise = z * (var + self.shrinkage * var.mean()).sqrt()[index]
        drawn = means + noise
        if self.clip:
            low, high = self.low.cpu(), self.high.cpu()
            known = low <= high  # no range before any update, nor from a checkpoint that did not keep it
            drawn = torch.maximum(torch.minimum(drawn, torch.where(known, high, torch.inf)),
                                  torch.where(known, low, -torch.inf))
        return drawn.float()

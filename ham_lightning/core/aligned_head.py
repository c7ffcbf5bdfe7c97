"""`AlignedHead`: a linear classifier aligned on per-class Gaussian feature statistics (SLCA's classifier
alignment), a statistics head of the registry (``aligned``)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ham_lightning.core.head import StatisticsHead


class AlignedHead(StatisticsHead):
    """A linear classifier aligned on per-class Gaussian feature statistics (SLCA's classifier alignment).

    Per class it keeps the feature sum, count and sum of squares; over all samples the sum of outer products, so
    the pooled within-class covariance ``S`` is exact whatever the task split. At every ``fit`` it draws
    ``samples_per_class`` features of every seen class from ``N(mean_c, cov_c)`` (``covariance="shared"``:
    ``cov_c = S``; ``"diagonal"``: the class's own variances) and trains the linear layer on them with
    cross-entropy over the seen classes (Adam, ``epochs`` passes, warm-started from the last fit), so old and new
    classes are compared on equal terms although no old image is kept. A full covariance per class (SLCA's) would
    be ``classes x dim^2`` numbers (1.3 GB for 200 x 1280 in float32), hence the pooled one. Sampling is seeded by
    ``seed`` and the number of fits: the same statistics give the same head.
    """

    def __init__(self, in_features: int, num_classes: int, samples_per_class: int = 256, epochs: int = 5,
                 lr: float = 1e-2, batch_size: int = 256, covariance: Literal["shared", "diagonal"] = "shared",
                 shrinkage: float = 1e-3, seed: int = 0) -> None:
        super().__init__(in_features, num_classes)
        if covariance not in ("shared", "diagonal"):
            raise ValueError(f"covariance must be 'shared' or 'diagonal', got {covariance!r}")
        if samples_per_class < 1 or epochs < 1 or batch_size < 1:
            raise ValueError("samples_per_class, epochs and batch_size must be >= 1, got "
                             f"{samples_per_class}, {epochs}, {batch_size}")
        self.samples_per_class, self.epochs, self.lr, self.batch_size = samples_per_class, epochs, lr, batch_size
        self.covariance, self.shrinkage, self.seed = covariance, shrinkage, seed
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.linear.requires_grad_(False)  # fitted in `fit`, never by the module's optimizer
        self.register_buffer("class_sum", torch.zeros(num_classes, in_features, dtype=torch.float64))
        self.register_buffer("class_sq", torch.zeros(num_classes, in_features, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("outer", torch.zeros(in_features, in_features, dtype=torch.float64))
        self.register_buffer("fits", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        f = features.double()
        self.class_sum.index_add_(0, labels, f)
        self.class_sq.index_add_(0, labels, f * f)
        self.class_count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.outer.add_(f.T @ f)

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

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``samples_per_class`` synthetic features of every seen class, and their labels."""
        classes = torch.nonzero(self.class_count > 0).flatten()
        means = self.means()[classes]
        m = self.samples_per_class
        z = torch.randn(len(classes), m, self.in_features, generator=generator, dtype=torch.float64)
        if self.covariance == "shared":
            factor = torch.linalg.cholesky(self.pooled_covariance().cpu())
            noise = z @ factor.T
        else:
            count = self.class_count[classes].clamp_min(1.0)[:, None]
            var = (self.class_sq[classes] / count - means**2).clamp_min(0.0).cpu()
            noise = z * (var + self.shrinkage * var.mean()).sqrt()[:, None, :]
        features = (means.cpu()[:, None, :] + noise).reshape(-1, self.in_features)
        return features.float(), classes.cpu().repeat_interleave(m)

    def fit(self) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.fits))
        features, labels = self.sample(generator)
        device = self.linear.weight.device
        linear = nn.Linear(self.in_features, self.num_classes).to(device)
        with torch.no_grad():
            linear.weight.copy_(self.linear.weight)
            linear.bias.copy_(self.linear.bias)
        optimizer = torch.optim.Adam(linear.parameters(), lr=self.lr)
        allowed = self.seen.to(device)
        with torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(len(labels), generator=generator)
                for start in range(0, len(order), self.batch_size):
                    index = order[start:start + self.batch_size]
                    x, y = features[index].to(device), labels[index].to(device)
                    logits = linear(x).masked_fill(~allowed, float("-inf"))
                    loss = nn.functional.cross_entropy(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight)
            self.linear.bias.copy_(linear.bias)
        self.fits += 1

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)

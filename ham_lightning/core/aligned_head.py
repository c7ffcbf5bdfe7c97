"""`AlignedHead`: a linear classifier aligned on per-class Gaussian feature statistics (SLCA's classifier
alignment), a statistics head of the registry (``aligned``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ham_lightning.core.class_gaussians import ClassGaussians, Covariance


class AlignedHead(ClassGaussians):
    """A linear classifier aligned on per-class Gaussian feature statistics (SLCA's classifier alignment).

    The statistics are `ClassGaussians`' (per-class means, a pooled or per-class diagonal covariance, exact
    whatever the task split). At every ``fit`` it draws ``samples_per_class`` features of every seen class and
    trains the linear layer on them with cross-entropy over the seen classes (Adam, ``epochs`` passes,
    warm-started from the last fit), so old and new classes are compared on equal terms although no old image is
    kept. Sampling is seeded by ``seed`` and the number of fits: the same statistics give the same head.
    """

    def __init__(self, in_features: int, num_classes: int, samples_per_class: int = 256, epochs: int = 5,
                 lr: float = 1e-2, batch_size: int = 256, covariance: Covariance = "shared",
                 shrinkage: float = 1e-3, seed: int = 0) -> None:
        super().__init__(in_features, num_classes, covariance=covariance, shrinkage=shrinkage)
        if samples_per_class < 1 or epochs < 1 or batch_size < 1:
            raise ValueError("samples_per_class, epochs and batch_size must be >= 1, got "
                             f"{samples_per_class}, {epochs}, {batch_size}")
        self.samples_per_class, self.epochs, self.lr, self.batch_size = samples_per_class, epochs, lr, batch_size
        self.seed = seed
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.linear.requires_grad_(False)  # fitted in `fit`, never by the module's optimizer
        self.register_buffer("fits", torch.zeros((), dtype=torch.long))

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``samples_per_class`` synthetic features of every seen class, and their labels."""
        labels = torch.nonzero(self.known).flatten().cpu().repeat_interleave(self.samples_per_class)
        return self.draw(labels, generator), labels

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

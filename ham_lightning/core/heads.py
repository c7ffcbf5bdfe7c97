"""The built-in heads (`ham_lightning.core.head.Head`): trained (`IncrementalHead`) or fitted from class
statistics (`NCMHead`, `RidgeHead`, `AlignedHead`), registered by name (`create_head`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ham_lightning.core.aligned_head import AlignedHead
from ham_lightning.core.head import (
    Head,
    StatisticsHead,
    create_head,
    is_statistics_head,
    list_heads,
    mark_task,
    register_head,
)

__all__ = ["AlignedHead", "Head", "IncrementalHead", "NCMHead", "RidgeHead", "StatisticsHead", "create_head",
           "is_statistics_head", "list_heads", "mark_task", "register_head"]

LogitMask = Literal["current", "seen"]
HeadKind = Literal["linear", "cosine"]
LambdaHoldout = Literal["all_tasks", "newest_task"]


class IncrementalHead(Head):
    """A linear head allocated up front for all classes, with per-task logit masking and frozen finished rows.

    ``kind="linear"`` is design.md's masked linear head; ``kind="cosine"`` compares normalised features and rows
    (``scale`` times the cosine), which keeps the logits of old and new tasks on one scale. Rows of finished tasks
    are served from buffers (``frozen_weight``), so no optimizer, weight decay or momentum
    can move them (design.md: ``freeze_old_rows``). The trainable ``weight`` keeps its shape across tasks.
    """

    def __init__(self, in_features: int, num_classes: int, mask: LogitMask = "current", freeze_old_rows: bool = True,
                 kind: HeadKind = "linear", scale: float = 16.0):
        super().__init__(num_classes)
        if mask not in ("current", "seen"):
            raise ValueError(f"mask must be 'current' or 'seen', got {mask!r}")
        if kind not in ("linear", "cosine"):
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        self.linear = nn.Linear(in_features, num_classes, bias=kind == "linear")
        self.mask, self.freeze_old_rows, self.kind, self.scale = mask, freeze_old_rows, kind, scale
        self.register_buffer("frozen_weight", torch.zeros(num_classes, in_features))
        self.register_buffer("frozen_bias", torch.zeros(num_classes))
        self.register_buffer("frozen", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

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


def fit_temperature(scores: Tensor, labels: Tensor, low: float = 1e-4, high: float = 1e4) -> float:
    """The temperature ``T`` minimising the negative log-likelihood of ``labels`` under ``softmax(scores / T)``.

    The likelihood is convex in ``1 / T``, so its derivative (expected score minus the label's score) is monotone:
    a bisection in float64 on ``log(1 / T)`` finds the optimum deterministically, clamped to ``[low, high]``."""
    s, y = scores.double(), labels.long()
    if s.shape[0] == 0 or s.shape[1] < 2:
        return 1.0  # nothing to calibrate: no samples, or one class
    target = s.gather(1, y[:, None]).mean()

    def slope(beta: float) -> float:  # d NLL / d beta
        return float((torch.softmax(beta * s, dim=1) * s).sum(1).mean() - target)

    lo, hi = math.log(1.0 / high), math.log(1.0 / low)
    if slope(math.exp(hi)) <= 0:
        return low
    if slope(math.exp(lo)) >= 0:
        return high
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(math.exp(mid)) < 0 else (lo, mid)
    return 1.0 / math.exp(0.5 * (lo + hi))


# -- heads that train nothing: class statistics accumulated task by task (`StatisticsHead`) ---------------------
class NCMHead(StatisticsHead):
    """Cosine nearest class mean: ``scale * cos(feature, mean_c)``; classes without a mean get ``-inf``."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__(in_features, num_classes)
        self.scale = scale
        self.register_buffer("class_sum", torch.zeros(num_classes, in_features, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        self.class_sum.index_add_(0, labels, features.to(self.class_sum.dtype))
        self.class_count.index_add_(0, labels, torch.ones_like(labels, dtype=self.class_count.dtype))

    def fit(self) -> None:
        """Means are read from the sums at every call: nothing to solve."""

    def forward(self, features: Tensor) -> Tensor:
        means = (self.class_sum / self.class_count.clamp_min(1.0)[:, None]).to(features.dtype)
        logits = self.scale * nn.functional.linear(nn.functional.normalize(features, dim=-1),
                                                   nn.functional.normalize(means, dim=-1))
        return logits.masked_fill(self.class_count == 0, float("-inf"))


class RidgeHead(StatisticsHead):
    """Random-projection ridge classifier (RanPAC-style): ``h = ReLU(f W_rand)``, ``W = (G + lam I)^-1 C``.

    ``W_rand`` (``in x projection``) is fixed and seeded; ``G = sum h^T h`` and ``C = sum h^T onehot(y)`` are summed
    task by task, so the solution equals a ridge regression on all tasks' features at once (when the features do
    not change). ``lam`` is chosen from ``lambdas`` by the squared error on a held-out part (``holdout``, drawn
    with a fixed seed) of the training samples, the ridge fitted on everything else: one eigendecomposition of that
    ``G`` makes every ``lam`` cheap. ``lambda_holdout="all_tasks"`` (the default) scores the held-out part of every
    task seen so far, from its own sums (``held_gram``, ``held_targets``: no sample is kept);
    ``"newest_task"`` scores the task just seen only, whose features are kept until that ``fit`` (at 50 tasks of
    2-4 classes that part is too small to choose from: on held-out images the frozen ridge fell from 58.3% at 10
    tasks to 52.3% at 50 on the same features, docs/results.md). The final solve uses every sample. Never the test
    split. The best ``lam`` grows with the number of samples, so it is chosen again only when that number has
    doubled since the last choice (tasks 1, 2, 4, 8, ... of equal size): the eigendecomposition is the costly part
    of a ``fit``.

    The choice is made to be stable under rounding (a different BLAS kernel, 1e-6 relative noise in the features):
    the errors are computed in float64; ``lam`` below ``noise_floor`` times the largest eigenvalue are not
    searched (there the float32 rounding of the summed products, not the data, orders the errors); among the rest
    the *largest* ``lam`` whose error is within ``lambda_rtol`` of the best is taken; and when that lands on an edge
    of the grid the grid is widened by decades (up to ``widen`` on each side), so the optimum is inside it.

    ``temperature`` calibrates the scores as probabilities (``softmax(scores / temperature)``): fitted at every
    ``fit`` by the likelihood of the held-out part's scores under the ridge solved without them.
    """

    #: Batches whose float32 products are summed before they are added to the float64 sums.
    flush_every: int = 16
    #: Relative slack on the best held-out error within which the larger ``lam`` is preferred.
    lambda_rtol: float = 1e-2
    #: ``lam`` below this fraction of the Gram's largest eigenvalue is not searched (float32 sums' rounding).
    noise_floor: float = 1e-6
    #: Decades the grid may grow by on each side when the choice lands on its edge.
    widen: int = 6

    def __init__(self, in_features: int, num_classes: int, projection: int = 2048, seed: int = 0,
                 lambdas: Sequence[float] = tuple(10.0 ** k for k in range(-4, 7)), holdout: float = 0.2,
                 lambda_holdout: LambdaHoldout = "all_tasks") -> None:
        super().__init__(in_features, num_classes)
        if lambda_holdout not in ("all_tasks", "newest_task"):
            raise ValueError(f"lambda_holdout must be 'all_tasks' or 'newest_task', got {lambda_holdout!r}")
        if projection < 0:
            raise ValueError(f"projection must be >= 0 (0: no random projection), got {projection}")
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {holdout}")
        generator = torch.Generator().manual_seed(seed)
        dim = projection or in_features
        self.projection, self.holdout, self.seed = projection, holdout, seed
        self.lambda_holdout = lambda_holdout
        self.lambdas = tuple(float(v) for v in lambdas)
        self.register_buffer("w_rand", torch.randn(in_features, projection, generator=generator)
                             if projection else torch.zeros(0))
        self.register_buffer("gram", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(dim, num_classes, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(dim, num_classes))
        # The held-out rows' own sums (part of `gram` / `targets` too), over every task: the choice of `lam`.
        every = lambda_holdout == "all_tasks"
        self.register_buffer("held_gram", torch.zeros((dim, dim) if every else (0,), dtype=torch.float64))
        self.register_buffer("held_targets", torch.zeros((dim, num_classes) if every else (0,), dtype=torch.float64))
        self.register_buffer("held_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("lam", torch.tensor(float("nan")))
        self.register_buffer("temperature", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count_at_selection", torch.zeros((), dtype=torch.float64))
        # The current task's held-out (h, y) until the next `fit`: not state (a statistics pass runs in one go).
        self._held_out: list[tuple[Tensor, Tensor]] = []
        # float32 sums of the latest batches' products, added to the float64 sums every `flush_every` batches and
        # before anything reads them (`_flush`): converting a 2048-wide Gram to float64 at every batch made
        # `update` 2.5x slower on CPU (docs/performance.md).
        self._pending: list[Tensor] | None = None
        self._pending_batches = 0

    def expand(self, features: Tensor) -> Tensor:
        """``ReLU(f W_rand)`` (or ``f`` itself with ``projection=0``)."""
        if not self.projection:
            return features
        return torch.relu(features @ self.w_rand.to(features.dtype))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        h = self.expand(features.float())
        t = nn.functional.one_hot(labels, self.num_classes).to(h.dtype)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.batches))
        held = (torch.rand(labels.shape[0], generator=generator) < self.holdout).to(h.device)
        products = [(h, h), (h, t)]
        if self.lambda_holdout == "all_tasks":
            products += [(h[held], h[held]), (h[held], t[held])]
        # float32 products of up to `flush_every` batches, summed in float64: the sums span many batches.
        if self._pending is None:
            self._pending = [a.T @ b for a, b in products]
        else:
            for pending, (a, b) in zip(self._pending, products):
                pending.addmm_(a.T, b)
        self._pending_batches += 1
        if self._pending_batches >= self.flush_every:
            self._flush()
        self.count += labels.shape[0]
        self.held_count += int(held.sum())
        self.batches += 1
        if held.any():
            self._held_out.append((h[held], labels[held]))

    def _flush(self) -> None:
        """Add the pending float32 sums into ``gram`` and ``targets`` (and the held-out rows' own sums)."""
        if self._pending is not None:
            for total, pending in zip((self.gram, self.targets, self.held_gram, self.held_targets), self._pending):
                total.add_(pending.double())
        self._pending, self._pending_batches = None, 0

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self._flush()  # the saved sums hold every batch seen
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._pending, self._pending_batches = None, 0  # loaded sums replace everything accumulated here
        self._held_out = []
        # A checkpoint from before `lambda_holdout` has no held-out sums: they start empty, so `lam` is scored on
        # the held-out rows of the tasks after it (the Gram then still holds every row).
        for name in ("held_gram", "held_targets", "held_count"):
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _solve(self, gram: Tensor, targets: Tensor, lam: float) -> Tensor:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        factor, info = torch.linalg.cholesky_ex(gram + lam * eye)  # symmetric positive definite for lam > 0
        if int(info) == 0:
            return torch.cholesky_solve(targets, factor)
        return torch.linalg.solve(gram + lam * eye, targets)

    def _held_out_tensors(self) -> tuple[Tensor, Tensor]:
        """The held-out ``h`` (float64) and labels of the task just seen."""
        hv = torch.cat([h for h, _ in self._held_out]).double()
        return hv, torch.cat([y for _, y in self._held_out])

    @torch.no_grad()
    def lambda_errors(self) -> dict[float, float]:
        """Held-out squared error of every ``lam`` searched (float64), the grid widened at its edges as needed.

        Empty when nothing is held out. One eigendecomposition of the Gram without the held-out rows: the error of
        each ``lam`` is then a diagonal scaling (``Q diag(1 / (e + lam)) Q^T``). ``all_tasks`` reads the error off
        the held-out sums (``|H W - T|^2 = tr(W^T H^T H W) - 2 tr(W^T H^T T) + n``)."""
        self._flush()
        if not self._held_out and not (self.lambda_holdout == "all_tasks" and float(self.held_count) > 0):
            return {}
        if self.lambda_holdout == "all_tasks":
            held_gram, held_targets = self.held_gram, self.held_targets
        else:
            hv, yv = self._held_out_tensors()
            tv = nn.functional.one_hot(yv, self.num_classes).double()
            held_gram, held_targets = hv.T @ hv, hv.T @ tv
        # float64: a float32 eigh halves this step's time but fails (or gives NaN errors) on near-degenerate Grams.
        eigvals, Q = torch.linalg.eigh(self.gram - held_gram)
        eigvals = eigvals.clamp_min(0)
        rhs = Q.T @ (self.targets - held_targets)
        floor = self.noise_floor * float(eigvals.max().clamp_min(torch.finfo(torch.float64).tiny))

        if self.lambda_holdout == "all_tasks":
            count = float(self.held_count)

            def error(lam: float) -> float:
                weight = Q @ (rhs / (eigvals + lam)[:, None])
                return float((weight * (held_gram @ weight)).sum() - 2 * (weight * held_targets).sum() + count)
        else:
            projected = hv @ Q

            def error(lam: float) -> float:
                return float(((projected / (eigvals + lam)) @ rhs - tv).pow(2).sum())

        errors = {lam: error(lam) for lam in sorted(self.lambdas) if lam >= floor}
        if not errors:  # the whole grid is below the noise floor: search upwards from it
            errors = {floor: error(floor)}
        for _ in range(self.widen):  # widen while the choice sits on an edge of what was searched
            chosen, searched = self._choose(errors), sorted(errors)
            if chosen == searched[-1]:
                errors[chosen * 10.0] = error(chosen * 10.0)
            elif chosen == searched[0] and chosen / 10.0 >= floor:
                errors[chosen / 10.0] = error(chosen / 10.0)
            else:
                break
        return errors

    def _choose(self, errors: dict[float, float]) -> float:
        """The largest ``lam`` within ``lambda_rtol`` of the least error: errors that differ by less are rounding
        and kernel noise, and the larger ``lam`` is the better-conditioned solve."""
        best = min(errors.values())
        return max(lam for lam, e in errors.items() if e <= best * (1 + self.lambda_rtol))

    @torch.no_grad()
    def select_lambda(self) -> float:
        """The ``lam`` chosen on the held-out part (see the class docstring); the current one (or the largest of
        ``lambdas``) when nothing is held out."""
        errors = self.lambda_errors()
        if not errors:
            return float(self.lam) if not torch.isnan(self.lam) else max(self.lambdas)
        return self._choose(errors)

    @torch.no_grad()
    def fit_temperature(self, lam: float) -> float:
        """Fit ``temperature`` on the held-out part: the ridge with ``lam`` solved without it scores it, and the
        temperature maximises the likelihood of its labels among the seen classes. Kept when nothing is held out."""
        self._flush()
        if not self._held_out:
            return float(self.temperature)
        hv, yv = self._held_out_tensors()
        tv = nn.functional.one_hot(yv, self.num_classes).double()
        weight = self._solve(self.gram - hv.T @ hv, self.targets - hv.T @ tv, lam)
        scores = (hv @ weight)[:, self.seen.to(hv.device)]
        labels = torch.cumsum(self.seen.long(), 0).to(hv.device)[yv] - 1  # label index among the seen classes
        self.temperature.fill_(fit_temperature(scores, labels))
        return float(self.temperature)

    @torch.no_grad()
    def fit(self) -> None:
        self._flush()
        if torch.isnan(self.lam) or float(self.count) >= 2 * float(self.count_at_selection):
            lam = self.select_lambda()
            self.count_at_selection.copy_(self.count)
        else:
            lam = float(self.lam)
        self.fit_temperature(lam)
        self._held_out = []
        self.weight.copy_(self._solve(self.gram, self.targets, lam).to(self.weight.dtype))
        self.lam.fill_(lam)

    def summary(self) -> dict[str, float]:
        """The ``lam`` and ``temperature`` of the latest fit."""
        return {"lam": float(self.lam), "temperature": float(self.temperature)}

    def probabilities(self, logits: Tensor) -> Tensor:
        """Calibrated class probabilities of this head's scores (``-inf`` for classes masked out)."""
        return torch.softmax(logits.double() / self.temperature.to(logits.device), dim=-1).to(logits.dtype)

    def forward(self, features: Tensor) -> Tensor:
        return self.expand(features) @ self.weight.to(features.dtype)


# -- the registry (``factory(in_features, num_classes, **common options)``) ------------------------------------
register_head("linear", lambda d, c, **kw: IncrementalHead(d, c, kind="linear", **kw))
register_head("cosine", lambda d, c, **kw: IncrementalHead(d, c, kind="cosine", **kw))
register_head("ncm", lambda d, c, mask=None, freeze_old_rows=None, scale=16.0, **kw: NCMHead(d, c, scale, **kw))
register_head("ridge", lambda d, c, mask=None, freeze_old_rows=None, scale=None, **kw: RidgeHead(d, c, **kw))
register_head("aligned", lambda d, c, mask=None, freeze_old_rows=None, scale=None, **kw: AlignedHead(d, c, **kw))

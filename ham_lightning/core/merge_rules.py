"""Merge rules: what happens to the adapters at a task boundary, one small class per method, in a registry.

`HAMConfig.method` names a rule; `create_merge_rule` builds it and `HAMController.end_task` runs it on the
controller, which a rule sees only through `MergeTarget` (what this module imports of the controller: nothing). Rules are
``nn.Module``s attached to the injected model (``<first HAM layer>.ham_state.merge_rule``), so a rule that keeps state
(``merge_ties``' per-task deltas) saves it in the model's ``state_dict`` and every method resumes from a Lightning
checkpoint. The registry is `ham_lightning.core.registry.MERGE_RULES` (`register_merge_rule`, `create_merge_rule`,
`list_merge_rules` use it).

* ``ham`` (`HierarchicalMerge`): design.md steps 1-7: similarity, assignment, prune, scale, merge into a group
  slot, reset the active adapter.
* ``seq_lora``: nothing; the one adapter keeps training on the next task (the naive lower bound).
* ``merge_sum``: ``E <- E + D_t``, no pruning; a fresh adapter for the next task trains on top of ``E``.
* ``merge_average``: ``E <- (k E + D_t) / (k + 1)`` with ``k`` tasks merged before: ``E`` is the mean of the
  task deltas (task arithmetic with weight ``1 / T``).
* ``merge_ties``: ``E <- TIES(D_1, ..., D_t)`` on dense per-layer deltas with PEFT's ``ties`` (trim to
  ``density``, elect sign by total mass, disjoint mean), re-factorised by truncated SVD to ``group_rank``.

The three ``merge_*`` baselines reuse HAM's layers: their merged adapter ``E`` lives in slot 0, so it is fused
into the frozen weight while the next task trains, exactly as a HAM group. The slot rank is capped at
``group_rank`` (beyond it the sum or average is truncated by SVD, Eckart-Young, as HAM's slots are). The group
scalar ``c_0`` is absorbed into the slot before each merge, so the rules act on the effective deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch
from torch import Tensor, nn

from ham_lightning.core import algebra
from ham_lightning.core.registry import MERGE_RULES

if TYPE_CHECKING:
    from ham_lightning.core.config import HAMConfig
    from ham_lightning.core.layer import HAMLayer

__all__ = [
    "HierarchicalMerge",
    "MergeAverage",
    "MergeDecision",
    "MergeRule",
    "MergeSum",
    "MergeTarget",
    "MergeTies",
    "SequentialLoRA",
    "SlotMerge",
    "create_merge_rule",
    "list_merge_rules",
    "register_merge_rule",
]

#: A group scalar smaller than this is absorbed into its slot's factors before a merge divides by it.
_MIN_GROUP_SCALE = 1e-4


@dataclass
class MergeDecision:
    """What one task boundary decided (an entry of `HAMController.history`)."""

    task: int
    group: int
    opened: bool
    similarities: list[float | None]  # cosine with each slot before the merge; None for empty slots
    importance: float  # a_t (mean over layers when per-layer)
    kept_fraction: float  # squared-norm fraction of the task delta kept by pruning
    group_ranks: list[int] = field(default_factory=list)  # max used rank per slot after the merge

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MergeTarget(Protocol):
    """What a rule may read and call of the controller it runs on (`HAMController` implements it)."""

    config: HAMConfig
    layers: dict[str, HAMLayer]

    @property
    def num_tasks_merged(self) -> int: ...
    @property
    def occupied(self) -> list[bool]: ...
    def similarities(self) -> list[float | None]: ...
    def group_similarities(self) -> list[float | None]: ...
    def reset_adapter(self, task: int) -> None: ...
    def adapter_parameters(self) -> list[nn.Parameter]: ...
    def scalar_parameters(self) -> list[nn.Parameter]: ...


class MergeRule(nn.Module):
    """The protocol of a task-boundary rule: `end_task` merges (or not) and returns the `MergeDecision`.

    The controller appends the decision to its history; a rule only changes the HAM layers' tensors (through
    ``controller.layers``) and its own state. State a rule must keep across tasks goes in this module's
    ``state_dict`` (buffers, or ``get_extra_state`` / ``set_extra_state`` for variable-size state), which is part
    of the model's, so Lightning checkpoints carry it.
    """

    #: The name the rule is registered under (``HAMConfig.method``); set by `register_merge_rule`.
    name: ClassVar[str] = ""

    def end_task(self, controller: MergeTarget) -> MergeDecision:
        """Run the boundary of the task just trained (``controller.num_tasks_merged``) and describe it."""
        raise NotImplementedError

    def num_parameters(self, controller: MergeTarget) -> dict[str, int]:
        """``trainable``: HAM parameters trained; ``adapter_stored``: adapter numbers kept (slots, adapter, scalars)."""
        own = controller.adapter_parameters() + controller.scalar_parameters()
        slots = sum(layer.group_A.numel() + layer.group_B.numel() for layer in controller.layers.values())
        return {"trainable": sum(p.numel() for p in own if p.requires_grad),
                "adapter_stored": slots + sum(p.numel() for p in own)}

    def extra_repr(self) -> str:
        return repr(self.name)


_R = TypeVar("_R", bound=type[MergeRule])


def register_merge_rule(name: str) -> Callable[[_R], _R]:
    """Class decorator: make a `MergeRule` subclass available as ``HAMConfig(method=name)`` (and
    ``--model.ham.method name``); a name already registered is refused."""

    def register(cls: _R) -> _R:
        if not (isinstance(cls, type) and issubclass(cls, MergeRule)):
            raise TypeError(f"register_merge_rule({name!r}) decorates a MergeRule subclass, got {cls!r}")
        MERGE_RULES.register(name, cls)
        cls.name = name
        return cls

    return register


def list_merge_rules() -> list[str]:
    """Names of the registered merge rules (the accepted values of ``HAMConfig.method``), sorted."""
    return MERGE_RULES.names()


def create_merge_rule(name: str, **kwargs: Any) -> MergeRule:
    """A new instance of the merge rule registered as ``name``."""
    return MERGE_RULES.create(name, **kwargs)


# -- helpers shared by the rules --------------------------------------------------------------------------------
def _mean_importance(controller: MergeTarget) -> float:
    layers = controller.layers.values()
    return sum(float(layer.importance) for layer in layers) / len(layers)


def _group_ranks(controller: MergeTarget) -> list[int]:
    layers = controller.layers.values()
    return [int(max(int(layer.group_rank_used[i]) for layer in layers)) for i in range(controller.config.max_groups)]


def _shared_group_scalars(controller: MergeTarget) -> list[nn.Parameter]:
    """Each distinct group-scalar tensor once (one shared by all layers, or one per layer)."""
    return list({id(layer.group_scalars): layer.group_scalars for layer in controller.layers.values()}.values())


def _compute(factors: algebra.Factors) -> algebra.Factors:
    """Factors in the dtype the merge runs in: at least float32 (float64 stays)."""
    dtype = torch.promote_types(factors[0].dtype, torch.float32)
    return factors[0].to(dtype), factors[1].to(dtype)


def merge_sum(E: algebra.Factors, D: algebra.Factors, group_rank: int) -> algebra.Factors:
    """Factors of ``E + D`` (rank capped at ``group_rank`` by truncated SVD)."""
    return _cap(*algebra.concat(*E, *D), group_rank)


def merge_average(E: algebra.Factors, D: algebra.Factors, k: int, group_rank: int) -> algebra.Factors:
    """Factors of ``(k E + D) / (k + 1)``: the running mean of ``k + 1`` task deltas."""
    w = 1.0 / (k + 1)
    return _cap(*algebra.concat(E[0] * (k * w), E[1], D[0] * w, D[1]), group_rank)


def ties_dense(deltas: list[Tensor], density: float, majority_sign_method: str = "total") -> Tensor:
    """TIES merge of dense deltas with unit weights: PEFT's ``peft.utils.merge_utils.ties``."""
    from peft.utils.merge_utils import ties

    weights = torch.ones(len(deltas), dtype=deltas[0].dtype, device=deltas[0].device)
    return ties(list(deltas), weights, density, majority_sign_method=majority_sign_method)  # type: ignore[arg-type]


def refactor(delta: Tensor, rank: int) -> algebra.Factors:
    """Best rank-``rank`` factors ``(B, A)`` of a dense ``out x in`` delta (truncated SVD, balanced)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    return algebra.drop_zero_rank(U[:, :k] * root, root[:, None] * Vh[:k])


def _cap(B: Tensor, A: Tensor, group_rank: int) -> algebra.Factors:
    if B.shape[1] > group_rank:
        B, A = algebra.truncate(B, A, group_rank)
    return algebra.drop_zero_rank(B, A)


# -- the rules --------------------------------------------------------------------------------------------------
@register_merge_rule("ham")
class HierarchicalMerge(MergeRule):
    """HAM's boundary (design.md steps 1-7): the task delta joins the most similar group slot, or opens one."""

    @staticmethod
    def choose_group(sims: list[float | None], threshold: float | None) -> tuple[int, bool]:
        """``(slot, opened)``: a free slot while one is left (and, with ``threshold``, the best cosine is below
        it), else the most similar occupied slot."""
        free = [g for g, s in enumerate(sims) if s is None]
        occupied = [(s, g) for g, s in enumerate(sims) if s is not None]
        best_sim, best = max(occupied) if occupied else (None, None)
        if free and (best is None or threshold is None or best_sim < threshold):
            return free[0], True
        assert best is not None
        return best, False

    @torch.no_grad()
    def end_task(self, controller: MergeTarget) -> MergeDecision:
        cfg = controller.config
        layers = controller.layers.values()
        sims = controller.group_similarities()
        g, opened = self.choose_group(sims, cfg.similarity_threshold)
        for c in _shared_group_scalars(controller):
            if opened:
                c[g] = 1.0
            elif c[g].abs() < _MIN_GROUP_SCALE:  # absorb c_g into the factors rather than divide by ~0
                for layer in layers:
                    if layer.group_scalars is c:
                        B, A = layer.slot_factors(g)
                        layer.set_slot(g, B * c[g], A)
                c[g] = 1.0
        kept, total = 0.0, 0.0
        for layer in layers:
            B_t, A_t = _compute(layer.task_delta())  # a_t B_t, A_t
            dtype = B_t.dtype
            B_p, A_p = algebra.drop_zero_rank(*algebra.prune(B_t, A_t, cfg.prune, cfg.density, cfg.rescale))
            total += float(algebra.norm_sq(B_t, A_t))
            kept += float(algebra.norm_sq(B_p, A_p))
            B_p = B_p / layer.group_scalars[g].to(dtype)  # enters the slot divided by c_g: E_g becomes E_g + D_t'
            B_g, A_g = layer.slot_factors(g) if not opened else (B_p[:, :0], A_p[:0])
            B_new, A_new = algebra.concat(B_g.to(dtype), A_g.to(dtype), B_p, A_p)
            if B_new.shape[1] > layer.group_rank:
                B_new, A_new = algebra.drop_zero_rank(*algebra.truncate(B_new, A_new, layer.group_rank))
            layer.set_slot(g, B_new, A_new)
        task = controller.num_tasks_merged
        importance = _mean_importance(controller)
        controller.reset_adapter(task + 1)
        return MergeDecision(task=task, group=g, opened=opened, similarities=sims, importance=importance,
                             kept_fraction=kept / total if total > 0 else 1.0, group_ranks=_group_ranks(controller))


@register_merge_rule("seq_lora")
class SequentialLoRA(MergeRule):
    """``seq_lora``: nothing merges and nothing resets; the one adapter keeps training on the next task."""

    def end_task(self, controller: MergeTarget) -> MergeDecision:
        return MergeDecision(task=controller.num_tasks_merged, group=0, opened=False,
                             similarities=[None] * controller.config.max_groups,
                             importance=_mean_importance(controller), kept_fraction=1.0,
                             group_ranks=_group_ranks(controller))

    def num_parameters(self, controller: MergeTarget) -> dict[str, int]:
        """The one adapter and its scalars (no slot is used)."""
        used = controller.adapter_parameters() + controller.scalar_parameters()
        return {"trainable": sum(p.numel() for p in used if p.requires_grad),
                "adapter_stored": sum(p.numel() for p in used)}


class SlotMerge(MergeRule):
    """Base of the baselines that keep one merged adapter ``E`` in slot 0: subclasses give `merge_layer`."""

    def merge_layer(self, controller: MergeTarget, name: str, E: algebra.Factors, D: algebra.Factors,
                    task: int) -> tuple[Tensor, Tensor, float, float]:
        """New slot factors ``(B, A)`` of layer ``name`` from its effective ``E`` and task delta ``D``, and the
        squared norms (kept, total) of what the rank cap dropped on purpose, or ``(0, 0)`` (kept fraction 1)."""
        raise NotImplementedError

    @torch.no_grad()
    def end_task(self, controller: MergeTarget) -> MergeDecision:
        task = controller.num_tasks_merged
        importance = _mean_importance(controller)
        sims = controller.similarities()
        occupied = controller.occupied[0]
        if occupied:  # absorb c_0 into the slot: the rules act on the effective delta E = c_0 B_0 A_0
            for layer in controller.layers.values():
                B, A = layer.group_delta(0)
                layer.set_slot(0, B.clone(), A.clone())
        for c in _shared_group_scalars(controller):
            c[0] = 1.0
        kept, total = 0.0, 0.0
        for name, layer in controller.layers.items():
            D = _compute(layer.task_delta())
            E = tuple(f.to(D[0].dtype) for f in layer.slot_factors(0)) if occupied else (D[0][:, :0], D[1][:0])
            B_new, A_new, k, t = self.merge_layer(controller, name, E, D, task)  # type: ignore[arg-type]
            kept, total = kept + k, total + t
            layer.set_slot(0, B_new, A_new)
        controller.reset_adapter(task + 1)
        return MergeDecision(task=task, group=0, opened=task == 0, similarities=sims, importance=importance,
                             kept_fraction=kept / total if total > 0 else 1.0, group_ranks=_group_ranks(controller))


@register_merge_rule("merge_sum")
class MergeSum(SlotMerge):
    """``merge_sum``: ``E <- E + D_t``."""

    def merge_layer(self, controller: MergeTarget, name: str, E: algebra.Factors, D: algebra.Factors,
                    task: int) -> tuple[Tensor, Tensor, float, float]:
        return (*merge_sum(E, D, controller.layers[name].group_rank), 0.0, 0.0)


@register_merge_rule("first_session")
class FirstSession(SlotMerge):
    """``first_session`` (RanPAC / APER style): the first task's adapter is kept (slot 0) and every later task's
    is discarded, so the backbone stays as adapted on the first task and the statistics head learns the rest.
    Later tasks still run their epochs (the boundary discards them); only their head statistics count."""

    def merge_layer(self, controller: MergeTarget, name: str, E: algebra.Factors, D: algebra.Factors,
                    task: int) -> tuple[Tensor, Tensor, float, float]:
        if task == 0:
            return (*merge_sum(E, D, controller.layers[name].group_rank), 0.0, 0.0)
        return E[0].clone(), E[1].clone(), 0.0, float(algebra.norm_sq(*D))


@register_merge_rule("merge_average")
class MergeAverage(SlotMerge):
    """``merge_average``: ``E <- (k E + D_t) / (k + 1)``, the mean of the task deltas."""

    def merge_layer(self, controller: MergeTarget, name: str, E: algebra.Factors, D: algebra.Factors,
                    task: int) -> tuple[Tensor, Tensor, float, float]:
        return (*merge_average(E, D, task, controller.layers[name].group_rank), 0.0, 0.0)


@register_merge_rule("merge_ties")
class MergeTies(SlotMerge):
    """``merge_ties``: ``E <- TIES(D_1..D_t)``; TIES is not incremental, so every task's delta is kept.

    The deltas (low-rank factors per layer and task) are this module's extra state: a list that grows by one entry
    per task, saved with the model's ``state_dict``.
    """

    def __init__(self) -> None:
        super().__init__()
        #: layer name -> one ``(B_t, A_t)`` per merged task (``a_t`` folded into ``B_t``).
        self.task_deltas: dict[str, list[algebra.Factors]] = {}

    def merge_layer(self, controller: MergeTarget, name: str, E: algebra.Factors, D: algebra.Factors,
                    task: int) -> tuple[Tensor, Tensor, float, float]:
        # Restored deltas come on the checkpoint's device: bring them to the layer's.
        stored = [(b.to(D[0]), a.to(D[1])) for b, a in self.task_deltas.get(name, [])]
        stored.append((D[0].clone(), D[1].clone()))
        self.task_deltas[name] = stored
        merged = ties_dense([algebra.dense(b, a) for b, a in stored], controller.config.density)
        B, A = refactor(merged, controller.layers[name].group_rank)
        # energy of the TIES merge kept by the rank-R re-factorisation
        return B, A, float(algebra.norm_sq(B, A)), float(merged.pow(2).sum())

    def num_parameters(self, controller: MergeTarget) -> dict[str, int]:
        """Slots, adapter and scalars, plus the stored per-task factors."""
        counts = super().num_parameters(controller)
        counts["adapter_stored"] += sum(b.numel() + a.numel() for v in self.task_deltas.values() for b, a in v)
        return counts

    def get_extra_state(self) -> dict[str, Any]:
        # New containers: a state dict taken now must not grow with later tasks (the tensors are never mutated).
        return {"task_deltas": {name: list(deltas) for name, deltas in self.task_deltas.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.task_deltas = {name: [(b, a) for b, a in deltas] for name, deltas in state["task_deltas"].items()}

"""`inject` HAM layers into any module, and the `HAMController` that runs the merge at task boundaries."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ham_lightning.core import algebra
from ham_lightning.core.config import HAMConfig
from ham_lightning.core.layer import HAMLayer
from ham_lightning.core.norm import freeze_norm_layers
from ham_lightning.core.targets import find_targets

#: A group scalar smaller than this is absorbed into its slot's factors before a merge divides by it.
_MIN_GROUP_SCALE = 1e-4


@dataclass
class MergeDecision:
    """What `HAMController.end_task` decided for one task."""

    task: int
    group: int
    opened: bool
    similarities: list[float | None]  # cosine with each slot before the merge; None for empty slots
    importance: float  # a_t (mean over layers when per-layer)
    kept_fraction: float  # squared-norm fraction of the task delta kept by pruning
    group_ranks: list[int] = field(default_factory=list)  # max used rank per slot after the merge

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HAMController:
    """Owns the HAM layers injected into a model: task boundaries, fold/unfold, history, state.

    It is not an ``nn.Module``: every tensor lives in the model (so ``model.state_dict()`` and Lightning
    checkpoints carry the slots), and the controller adds the merge history on top.
    """

    def __init__(self, model: nn.Module, layers: dict[str, HAMLayer], config: HAMConfig) -> None:
        self.model = model
        self.layers = layers
        self.config = config
        self.history: list[MergeDecision] = []
        self._folded: dict[str, nn.Module] | None = None
        #: Every task's delta per layer, kept only by ``method="merge_ties"`` (TIES re-merges all of them).
        self.task_deltas: dict[str, list[algebra.Factors]] = {}

    # -- inspection ---------------------------------------------------------------------------------------------
    @property
    def num_tasks_merged(self) -> int:
        return len(self.history)

    @property
    def occupied(self) -> list[bool]:
        first = next(iter(self.layers.values()))
        return [bool(v) for v in first.group_occupied.tolist()]

    @property
    def num_groups(self) -> int:
        return sum(self.occupied)

    @property
    def assignments(self) -> list[int]:
        return [d.group for d in self.history]

    def scalar_parameters(self) -> list[nn.Parameter]:
        """The importance and group scalars, each once (they may be shared by all layers)."""
        seen: dict[int, nn.Parameter] = {}
        for layer in self.layers.values():
            for p in (layer.importance, layer.group_scalars):
                seen.setdefault(id(p), p)
        return list(seen.values())

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The active task adapter's LoRA factors of every layer."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def num_parameters(self) -> dict[str, int]:
        """Counts: trainable HAM parameters, and stored adapter numbers (slot buffers, scalars, active adapter).

        Baselines count what they use: ``seq_lora`` the one adapter (no slots), ``ncm`` nothing (its class means
        are counted by `HAMModule`), ``merge_ties`` also the stored per-task factors.
        """
        method = self.config.method
        if method == "ncm":
            return {"trainable": 0, "adapter_stored": 0}
        if method == "seq_lora":
            used = [p for p in self.adapter_parameters() + self.scalar_parameters()]
            return {"trainable": sum(p.numel() for p in used if p.requires_grad),
                    "adapter_stored": sum(p.numel() for p in used)}
        trainable = sum(p.numel() for p in self.adapter_parameters() + self.scalar_parameters() if p.requires_grad)
        slots = sum(layer.group_A.numel() + layer.group_B.numel() for layer in self.layers.values())
        stored = slots + sum(p.numel() for p in self.adapter_parameters() + self.scalar_parameters())
        if method == "merge_ties":
            stored += sum(b.numel() + a.numel() for deltas in self.task_deltas.values() for b, a in deltas)
        return {"trainable": trainable, "adapter_stored": stored}

    def named_layers(self) -> Iterator[tuple[str, HAMLayer]]:
        return iter(self.layers.items())

    # -- the task boundary --------------------------------------------------------------------------------------
    @torch.no_grad()
    def similarities(self) -> list[float | None]:
        """Cosine between the active task delta and each occupied slot's effective delta (None if empty)."""
        task = [layer.task_delta() for layer in self.layers.values()]
        measure = algebra.cosine if self.config.similarity == "concat" else algebra.mean_layer_cosine
        out: list[float | None] = []
        for g, occupied in enumerate(self.occupied):
            if not occupied:
                out.append(None)
                continue
            group = [layer.group_delta(g) for layer in self.layers.values()]
            out.append(float(measure(task, group)))
        return out

    def _choose_group(self, sims: list[float | None]) -> tuple[int, bool]:
        free = [g for g, s in enumerate(sims) if s is None]
        occupied = [(s, g) for g, s in enumerate(sims) if s is not None]
        best_sim, best = max(occupied) if occupied else (None, None)
        tau = self.config.similarity_threshold
        if free and (best is None or tau is None or best_sim < tau):
            return free[0], True
        assert best is not None
        return best, False

    @torch.no_grad()
    def end_task(self) -> MergeDecision:
        """Similarity, assignment, prune, scale, merge into a slot, reset the active adapter (design.md steps 1-7)."""
        if self._folded is not None:
            raise RuntimeError("end_task() on a folded model: call unfold() first.")
        if self.config.method != "ham":
            from ham_lightning.core import merge_rules as baselines

            return baselines.end_task(self)
        cfg = self.config
        sims = self.similarities()
        g, opened = self._choose_group(sims)
        scalars = {id(layer.group_scalars): layer.group_scalars for layer in self.layers.values()}
        if opened:
            for c in scalars.values():
                c[g] = 1.0
        else:
            for c in scalars.values():
                if c[g].abs() < _MIN_GROUP_SCALE:  # absorb c_g into the factors rather than divide by ~0
                    for layer in self.layers.values():
                        if layer.group_scalars is c:
                            B, A = layer.slot_factors(g)
                            layer.set_slot(g, B * c[g], A)
                    c[g] = 1.0
        kept, total = 0.0, 0.0
        importances = []
        for layer in self.layers.values():
            B_t, A_t = layer.task_delta()  # a_t B_t, A_t
            dtype = torch.promote_types(B_t.dtype, torch.float32)
            B_t, A_t = B_t.to(dtype), A_t.to(dtype)
            importances.append(float(layer.importance))
            B_p, A_p = algebra.drop_zero_rank(*algebra.prune(B_t, A_t, cfg.prune, cfg.density, cfg.rescale))
            total += float(algebra.norm_sq(B_t, A_t))
            kept += float(algebra.norm_sq(B_p, A_p))
            B_p = B_p / layer.group_scalars[g].to(dtype)  # enters the slot divided by c_g: E_g becomes E_g + D_t'
            B_g, A_g = layer.slot_factors(g) if not opened else (B_p[:, :0], A_p[:0])
            B_new, A_new = algebra.concat(B_g.to(dtype), A_g.to(dtype), B_p, A_p)
            if B_new.shape[1] > layer.group_rank:
                B_new, A_new = algebra.drop_zero_rank(*algebra.truncate(B_new, A_new, layer.group_rank))
            layer.set_slot(g, B_new, A_new)
        task = len(self.history)
        self.reset_adapter(task + 1)
        decision = MergeDecision(
            task=task, group=g, opened=opened, similarities=sims,
            importance=sum(importances) / len(importances),
            kept_fraction=kept / total if total > 0 else 1.0,
            group_ranks=[int(max(int(layer.group_rank_used[i]) for layer in self.layers.values()))
                         for i in range(cfg.max_groups)],
        )
        self.history.append(decision)
        return decision

    @torch.no_grad()
    def reset_adapter(self, task: int) -> None:
        """Fresh active adapter for ``task``: seeded ``A`` (seed, task, layer), zero ``B``, ``a_t = 1``."""
        for i, layer in enumerate(self.layers.values()):
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + task * 10_007 + i)
            layer.reset_adapter(generator)
            layer.importance.fill_(1.0)

    # -- fold / unfold ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Write the merged delta into each base weight and put plain modules back: zero inference overhead.

        The model then has exactly the bare backbone's modules and parameters; `unfold` restores the HAM layers
        (their original ``W0`` is kept), so training can continue.
        """
        if self._folded is not None:
            return self.model
        self._folded = {}
        for name, layer in self.layers.items():
            plain = copy.deepcopy(layer.base)
            plain.weight.copy_(layer.merged_weight())
            self._folded[name] = plain
            _set_submodule(self.model, name, plain)
        return self.model

    def unfold(self) -> nn.Module:
        """Put the HAM layers back after `fold`."""
        if self._folded is None:
            return self.model
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer)
        self._folded = None
        return self.model

    @property
    def is_folded(self) -> bool:
        return self._folded is not None

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """History and config, plus every HAM tensor (slots, scalars, active adapter) by layer name."""
        tensors = {}
        for name, layer in self.layers.items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base."):
                    tensors[f"{name}.{key}"] = value.detach().clone()
        state = {"config": self.config.to_dict(), "history": [d.to_dict() for d in self.history], "tensors": tensors}
        if self.task_deltas:
            state["task_deltas"] = {k: [(b.clone(), a.clone()) for b, a in v] for k, v in self.task_deltas.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; the tensors part may be absent (Lightning restores the model)."""
        self.history = [MergeDecision(**d) for d in state.get("history", [])]
        if "task_deltas" in state:
            self.task_deltas = {k: [(b.clone(), a.clone()) for b, a in v] for k, v in state["task_deltas"].items()}
        tensors = state.get("tensors")
        if tensors:
            with torch.no_grad():
                for name, layer in self.layers.items():
                    own = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}
                    for key in own:
                        getattr_path(layer, key).copy_(tensors[f"{name}.{key}"])
                    layer.refresh()


def getattr_path(module: nn.Module, dotted: str) -> torch.Tensor:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def inject(model: nn.Module, config: HAMConfig | None = None) -> HAMController:
    """Put HAM layers into ``model`` in place, freeze everything else, and return the controller.

    The controller is also stored as ``model.ham_controller`` so Lightning callbacks can find it.
    """
    config = config or HAMConfig()
    if any(isinstance(m, HAMLayer) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has HAM layers; inject() once per model.")
    names = find_targets(model, config.target_modules, config.exclude_modules, config.adapt_from)
    for p in model.parameters():
        p.requires_grad_(False)
    if config.freeze_norm:
        freeze_norm_layers(model)
    device = next(model.parameters()).device

    def new_scalars() -> tuple[nn.Parameter, nn.Parameter]:
        importance = nn.Parameter(torch.ones((), device=device), requires_grad=config.train_importance)
        groups = nn.Parameter(torch.ones(config.max_groups, device=device), requires_grad=config.train_group_scalars)
        return importance, groups

    shared = new_scalars() if config.scalar_granularity == "adapter" else None
    layers: dict[str, HAMLayer] = {}
    for name in names:
        importance, groups = shared or new_scalars()
        layer = HAMLayer(model.get_submodule(name), config.rank, config.max_groups, config.group_rank,
                         config.scaling, importance, groups)
        _set_submodule(model, name, layer)
        layers[name] = layer
    controller = HAMController(model, layers, config)
    controller.reset_adapter(0)
    model.ham_controller = controller
    return controller


def find_controller(model: nn.Module) -> HAMController | None:
    """The `HAMController` of ``model`` or of one of its submodules (set by `inject`), if any."""
    for module in model.modules():
        controller = module.__dict__.get("ham_controller")
        if isinstance(controller, HAMController):
            return controller
    return None

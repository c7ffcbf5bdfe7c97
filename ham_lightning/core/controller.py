"""`inject` HAM layers into any module, and the `HAMController` that runs the merge at task boundaries."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ham_lightning.core import algebra
from ham_lightning.core.adapter_init import init_from_inputs
from ham_lightning.core.config import HAMConfig
from ham_lightning.core.distributed import summed
from ham_lightning.core.layer import HAMLayer
from ham_lightning.core.merge_rules import HierarchicalMerge, MergeDecision, MergeRule, create_merge_rule
from ham_lightning.core.norm import freeze_norm_layers
from ham_lightning.core.routing import PrefixRouter, Routes, input_dim, run_observed
from ham_lightning.core.subspace import InputSubspace
from ham_lightning.core.targets import find_targets

#: Name of the controller's state module (history and merge rule), a child of the first HAM layer.
STATE_NAME = "ham_state"
#: Keys of a HAM layer's state dict that are not its own HAM tensors: the frozen base and the state module.
_NOT_LAYER_TENSORS = ("base.", STATE_NAME + ".")


class HAMControllerState(nn.Module):
    """The controller's place in the model's ``state_dict``: its merge history, merge rule and input subspace.

    `HAMController` registers it as the child ``ham_state`` of the first HAM layer (``controller.state_name``,
    e.g. ``blocks.0.attn.qkv.ham_state``), so ``model.state_dict()`` (and so a Lightning checkpoint of a module
    holding the model) carries ``<state_name>._extra_state`` (the history) and the rule's own state under
    ``<state_name>.merge_rule`` and, with ``protect_inputs``, the `InputSubspace` under ``<state_name>.subspace``.
    Not a child of the model itself: a new child would change what an ``nn.Sequential`` runs or what
    ``children()`` lists. The controller stays the one owner of the history; this module only reads and writes it.
    """

    def __init__(self, controller: HAMController, merge_rule: MergeRule, subspace: InputSubspace | None) -> None:
        super().__init__()
        self.merge_rule = merge_rule
        self.subspace = subspace
        self.controller = controller  # not a Module: a plain attribute, not a submodule

    def get_extra_state(self) -> dict[str, Any]:
        return {"history": [d.to_dict() for d in self.controller.history]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.controller.history = [MergeDecision(**d) for d in state["history"]]


class HAMController:
    """Owns the HAM layers injected into a model: task boundaries, fold/unfold, history, state.

    It is not an ``nn.Module``: every tensor lives in the model, and so does the rest of its state: the merge
    rule (``HAMConfig.method``, see `ham_lightning.core.merge_rules`), the history and the input subspace are in
    the `HAMControllerState` module under the first HAM layer (``state_name``), so ``model.state_dict()`` and
    Lightning checkpoints carry the slots, the history, the rule's state and the protected subspaces.

    Input protection (``HAMConfig.protect_inputs > 0``): the controller owns the `InputSubspace` of its layers;
    whoever drives the sequence (`ham_lightning.HierarchicalMergeCallback`) calls `protect_` at each task's
    start and after every optimizer step, and runs one pass over each finished task's training data inside
    `collecting_inputs`, then `update_protection`.
    """

    def __init__(self, model: nn.Module, layers: dict[str, HAMLayer], config: HAMConfig) -> None:
        self.model = model
        self.layers = layers
        self.config = config
        #: One `MergeDecision` per task boundary; the one copy of the merge history.
        self.history: list[MergeDecision] = []
        self._folded: dict[str, nn.Module] | None = None
        slots = config.max_groups if config.protect_scope == "group" else 1
        subspace = InputSubspace(layers, config.protect_inputs, slots) if config.protect_inputs > 0 else None
        self._state = HAMControllerState(self, create_merge_rule(config.method), subspace)
        first = next(iter(layers))
        layers[first].add_module(STATE_NAME, self._state)
        #: Per-task / per-slot statistics of the adapted part's pooled inputs (`HAMConfig.routing`,
        #: ``similarity_source="data"``); a child of the state module, so checkpoints carry it.
        self.router: PrefixRouter | None = None
        if config.routing or config.similarity_source == "data":
            block = model.get_submodule(config.adapt_from)
            self.router = PrefixRouter(input_dim(block), config.max_groups)
            self._state.router = self.router
            block.register_forward_pre_hook(self._route_hook)
        #: Where the state module sits in the model (``<first HAM layer>.ham_state``), for its state-dict keys.
        self.state_name = f"{first}.{STATE_NAME}"

    # -- inspection ---------------------------------------------------------------------------------------------
    @property
    def merge_rule(self) -> MergeRule:
        """The task-boundary rule chosen by ``config.method``."""
        return self._state.merge_rule

    @property
    def subspace(self) -> InputSubspace | None:
        """Earlier tasks' input subspaces, kept off each new adapter (``protect_inputs > 0``), else None."""
        return self._state.subspace

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
        """Counts: trainable HAM parameters, and stored adapter numbers, as the merge rule uses them.

        HAM and the merging baselines: slot buffers, scalars and active adapter (``merge_ties`` also its stored
        per-task factors); ``seq_lora``: the one adapter.
        """
        return self.merge_rule.num_parameters(self)

    def named_layers(self) -> Iterator[tuple[str, HAMLayer]]:
        return iter(self.layers.items())

    # -- routing ------------------------------------------------------------------------------------------------
    def _route_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        assert self.router is not None
        routes = self.router.routes_for(args[0], training=module.training)
        if not self.config.routing:
            routes = None
        for layer in self.layers.values():
            layer.route = routes

    @property
    def last_routes(self) -> Routes | None:
        """The per-input slots of the latest forward (None when the model does not route)."""
        return next(iter(self.layers.values())).route

    @torch.no_grad()
    def observe_task(self, batches: Iterable[Any], forward: Callable[[Any], Any]) -> list[float | None]:
        """Record the current task's data statistics (``forward(x)`` of each batch, stopped at the adapted part)
        and plan its slot: the adapter then trains on top of that slot's delta and joins it at the boundary.
        Under DDP each rank passes its share of the batches and the sums are added over the ranks.
        Returns the data similarity to every slot. Needs a router (`HAMConfig.routing` or data similarity)."""
        if self.router is None:
            raise RuntimeError("observe_task needs HAMConfig.routing=True or similarity_source='data'.")
        self.router.reset_task()
        with self.router.observing(), summed(self.router.task_statistics()):
            for x in batches:
                run_observed(lambda x=x: forward(x))
        sims = self.router.similarities(self.occupied)
        if self.config.similarity_source == "data":
            g, _ = HierarchicalMerge.choose_group(sims, self.config.similarity_threshold)
            self.router.planned.fill_(g if self.config.method == "ham" else -1)
        return sims

    # -- the task boundary --------------------------------------------------------------------------------------
    @torch.no_grad()
    def group_similarities(self) -> list[float | None]:
        """What a merge rule compares the task with: the data similarity of the task's inputs to each slot's
        (``similarity_source="data"``), else the cosine of the deltas (`similarities`)."""
        if self.config.similarity_source == "data":
            assert self.router is not None
            return self.router.similarities(self.occupied)
        return self.similarities()

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

    @torch.no_grad()
    def end_task(self) -> MergeDecision:
        """Run the merge rule at the end of a task (HAM: design.md steps 1-7) and record its decision."""
        if self._folded is not None:
            raise RuntimeError("end_task() on a folded model: call unfold() first.")
        decision = self.merge_rule.end_task(self)
        if self.router is not None and self.router.has_task_statistics:
            self.router.commit(decision.group)
            self.router.reset_task()
        self.history.append(decision)
        return decision

    @torch.no_grad()
    def reset_adapter(self, task: int) -> None:
        """Fresh active adapter for ``task``: seeded ``A`` (seed, task, layer; with ``adapter_init="shared"`` the
        same ``A`` for every task), zero ``B``, ``a_t = 1``."""
        draw = 0 if self.config.adapter_init == "shared" else task
        for i, layer in enumerate(self.layers.values()):
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + draw * 10_007 + i)
            layer.reset_adapter(generator)
            layer.importance.fill_(1.0)

    # -- input protection (HAMConfig.protect_inputs) -------------------------------------------------------------
    @property
    def needs_input_pass(self) -> bool:
        """Whether each task's end needs a pass over its training data (`collecting_inputs`)."""
        return self.subspace is not None

    def protect_(self) -> None:
        """Project the active adapter's ``A`` off earlier tasks' input subspaces (no-op without protection); with
        ``protect_scope="group"`` off those of the slot the task will join (planned at its start) only."""
        if self.subspace is None:
            return
        if self.subspace.slots > 1:
            assert self.router is not None
            if int(self.router.planned) < 0:
                return  # no slot planned yet (before the task's data was observed)
            self.subspace.slot = int(self.router.planned)
        self.subspace.project_()

    @property
    def adapter_is_fresh(self) -> bool:
        """Whether the active adapter has not trained yet (``B = 0`` in every layer: its delta is still zero)."""
        return all(not bool(layer.lora_B.any()) for layer in self.layers.values())

    def init_adapter_from_inputs(self, batches: Iterable[Any], forward: Callable[[Any], Any]) -> None:
        """``adapter_init="inputs"``: each layer's ``A`` from the current task's inputs to it (``forward(x)`` of
        each batch, routed to the planned slot as in training), off the protected subspace of the slot the task
        will join (`ham_lightning.core.adapter_init`). Under DDP each rank passes its share."""
        if self.subspace is not None and self.subspace.slots > 1:
            assert self.router is not None
            self.subspace.slot = max(int(self.router.planned), 0)
        routes = self.router.planned_routes() if self.router is not None else contextlib.nullcontext()
        init_from_inputs(self.layers, batches, forward, routes, self.subspace)

    def _slot_of_last_task(self) -> None:
        assert self.subspace is not None
        if self.subspace.slots > 1 and self.history:
            self.subspace.slot = self.history[-1].group

    def collecting_inputs(self) -> contextlib.AbstractContextManager[None]:
        """While active, every HAM layer's inputs add to its input moment (a no-op context without protection);
        with ``protect_scope="group"`` to the moment of the slot the last task joined."""
        if self.subspace is None:
            return contextlib.nullcontext()
        self._slot_of_last_task()
        return self.subspace.collect()

    def update_protection(self) -> None:
        """The subspaces from the moments collected so far (after the pass over a finished task's data), keeping
        `HAMConfig.protect_energy` of the tasks in the last task's slot (scope ``group``) or in the model."""
        if self.subspace is not None:
            self._slot_of_last_task()
            grouped = self.subspace.slots > 1 and self.history
            k = sum(d.group == self.history[-1].group for d in self.history) if grouped else len(self.history)
            self.subspace.update(self.config.protect_energy(k))

    # -- fold / unfold ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Write the merged delta into each base weight and put plain modules back: zero inference overhead.

        The model then has exactly the bare backbone's modules and parameters (the state module leaves with the
        first HAM layer); `unfold` restores the HAM layers (their original ``W0`` is kept), so training can
        continue.
        """
        if self._folded is not None:
            return self.model
        if self.config.routing:
            raise RuntimeError("fold() writes every group into one weight, but this model routes each input to "
                               "one group (HAMConfig.routing=True): run it unfolded, or set routing=False for the "
                               "paper's merged inference.")
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
        """History, config and merge-rule state, plus every HAM tensor (slots, scalars, active adapter) by layer.

        The model's own ``state_dict`` holds all of it too (what Lightning checkpoints save); this one is for
        use without the model's other weights.
        """
        tensors = {}
        for name, layer in self.layers.items():
            for key, value in layer.state_dict().items():
                if not key.startswith(_NOT_LAYER_TENSORS):
                    tensors[f"{name}.{key}"] = value.detach().clone()
        state = {"config": self.config.to_dict(), "history": [d.to_dict() for d in self.history], "tensors": tensors,
                 "merge_rule": self.merge_rule.state_dict()}
        if self.subspace is not None:
            state["subspace"] = {k: v.detach().clone() for k, v in self.subspace.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; the tensors part may be absent (Lightning restores the model)."""
        self.history = [MergeDecision(**d) for d in state.get("history", [])]
        if "merge_rule" in state:
            self.merge_rule.load_state_dict(state["merge_rule"])
        if self.subspace is not None and "subspace" in state:
            self.subspace.load_state_dict(state["subspace"])
        tensors = state.get("tensors")
        if tensors:
            with torch.no_grad():
                for name, layer in self.layers.items():
                    own = {k: v for k, v in layer.state_dict().items() if not k.startswith(_NOT_LAYER_TENSORS)}
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

    The controller is also stored as ``model.ham_controller`` so Lightning callbacks can find it, and its state
    (merge history, merge rule) is registered under the first HAM layer (``controller.state_name``).
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

"""`HAMConfig`: every knob of the HAM adapters and of the merge at task boundaries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ham_lightning.core.registry import MERGE_RULES

PruneMode = Literal["magnitude", "rank", "none"]
Granularity = Literal["adapter", "layer"]
SimilarityReduction = Literal["concat", "layer_mean"]
AdapterInit = Literal["shared", "per_task", "inputs"]
SimilaritySource = Literal["weights", "data"]
ProtectScope = Literal["all", "group"]
#: The built-in merge rules: HAM's hierarchical merge and the baselines (docs/results.md). ``HAMConfig.method`` is
#: any name of the registry (`ham_lightning.core.registry.MERGE_RULES`), which
#: `ham_lightning.core.merge_rules.register_merge_rule` adds to.
METHODS: tuple[str, ...] = ("ham", "seq_lora", "merge_sum", "merge_average", "merge_ties", "first_session")

#: ViT-B/16 targets of the authors' related code (LoRA on attention qkv and the MLP).
DEFAULT_TARGETS: tuple[str, ...] = ("qkv", "fc1", "fc2")


@dataclass
class HAMConfig:
    """Configuration of HAM layers and of the hierarchical merge (design.md section 1).

    Target matching follows PEFT: a list of names matches a module whose full name equals an entry or ends with
    ``"." + entry``; a single string is a regular expression that must match the full name. Only ``nn.Linear``
    and 1x1 ``nn.Conv2d`` (groups=1) can be adapted; other matched modules (a ViT's ``patch_embed.proj`` 16x16
    conv) are skipped with a warning that names them.
    """

    target_modules: list[str] | str = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "Module names (PEFT suffix match) or one regex (full match) to adapt."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or regex of modules never adapted, same semantics."}
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r of each task adapter."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the delta is scaled by alpha / rank."})
    max_groups: int = field(default=4, metadata={"help": "Number of pre-allocated group slots G_max."})
    group_rank: int = field(
        default=32, metadata={"help": "Rank cap R_max of a group slot; beyond it the slot is SVD re-factorised."}
    )
    prune: PruneMode = field(
        default="magnitude", metadata={"help": "How a task delta is pruned before merging: magnitude, rank, none."}
    )
    density: float = field(
        default=0.5,
        metadata={"help": "Kept fraction: of entries of A and B (magnitude) or of spectral energy (rank)."},
    )
    rescale: bool = field(
        default=False, metadata={"help": "DARE-style rescale of magnitude-pruned factors by 1 / density."}
    )
    similarity_threshold: float | None = field(
        default=None,
        metadata={"help": "tau: open a free slot only if the best cosine is below tau (None: always while free)."},
    )
    similarity_source: SimilaritySource = field(
        default="weights",
        metadata={"help": "What a task is compared with each slot by: 'weights' (cosine of the deltas, design.md) or "
                          "'data' (overlap of the pooled inputs of the adapted part, measured at the task's start; "
                          "with routing the adapter then trains on top of its slot). Needs adapt_from."},
    )
    routing: bool = field(
        default=False,
        metadata={"help": "Route each input to the one slot its pooled inputs at adapt_from resemble and apply that "
                          "slot's delta only (False: every slot's delta on every input, the paper's merged "
                          "inference). Needs adapt_from; fold() is then refused."},
    )
    similarity: SimilarityReduction = field(
        default="concat",
        metadata={"help": "Cosine over all adapted layers concatenated, or the mean of per-layer cosines."},
    )
    scalar_granularity: Granularity = field(
        default="adapter",
        metadata={"help": "One importance scalar a_t and group scalars c_g per adapter, or per layer."},
    )
    train_importance: bool = field(default=True, metadata={"help": "Learn the importance scalar a_t."})
    train_group_scalars: bool = field(
        default=False,
        metadata={"help": "Learn the group scalars c_g (design.md: learned; off by default: no accuracy gain measured "
                          "and 1.4x the step cost, docs/results.md)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of each new task adapter's A init (seed, task)."})
    adapter_init: AdapterInit = field(
        default="shared",
        metadata={"help": "Initial A of each task adapter: 'shared' (one seeded draw per layer for every task, so "
                          "task deltas live in comparable row spaces and their cosine means something) or "
                          "'per_task' (a fresh draw per task: deltas are near-orthogonal whatever the data) or "
                          "'inputs' (the top principal directions of the task's own inputs to each layer, off the "
                          "protected subspace: InfLoRA / PEFT's EVA; needs a pass over the task's data at its start, "
                          "which HierarchicalMergeCallback runs)."},
    )
    freeze_norm: bool = field(
        default=True,
        metadata={"help": "Keep the backbone's BatchNorm layers in eval mode from the first step (frozen running "
                          "statistics), whatever calls train()."},
    )
    protect_inputs: float = field(
        default=0.0,
        metadata={"help": "Project each new adapter's A off the principal subspace holding this fraction of "
                          "earlier tasks' layer-input energy (GPM/InfLoRA-style; less drift of old features). "
                          "0 disables."},
    )
    protect_ramp: list[float] | None = field(
        default=None,
        metadata={"help": "Energies for the first tasks of a slot (protect_scope 'group') or of the model ('all'): "
                          "after the k-th task the subspace holds protect_ramp[k-1] of the energy, protect_inputs "
                          "after the last (GPM's growing threshold: the first tasks have little to protect)."},
    )
    protect_scope: ProtectScope = field(
        default="all",
        metadata={"help": "Whose input subspaces a new adapter is kept off: 'all' (every earlier task's: needed when "
                          "every group acts on every input) or 'group' (only those of the earlier tasks in the slot "
                          "it joins: with routing an input meets its own group's delta alone). 'group' needs "
                          "routing and similarity_source='data' (the slot is chosen at the task's start)."},
    )
    adapt_from: str | None = field(
        default=None,
        metadata={"help": "Adapt only modules at and above this block (e.g. 'blocks.5'); everything below is a "
                          "frozen prefix whose output can be cached. None: adapt every matched module."},
    )
    method: str = field(
        default="ham",
        metadata={"help": "Task-boundary rule: ham (hierarchical merge) or a baseline: seq_lora (one adapter kept "
                          "training), merge_sum (E += D_t), merge_average (E = mean of D_1..D_t), merge_ties (TIES "
                          "of D_1..D_t, PEFT); any name registered with register_merge_rule."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        errors = []
        if not self.target_modules:
            errors.append("target_modules is empty: name the modules to adapt, e.g. ['qkv', 'fc1', 'fc2']")
        if self.rank < 1:
            errors.append(f"rank must be >= 1, got {self.rank}")
        if self.max_groups < 1:
            errors.append(f"max_groups must be >= 1, got {self.max_groups}")
        if self.group_rank < self.rank:
            errors.append(f"group_rank ({self.group_rank}) must be >= rank ({self.rank}) so a task fits in a slot")
        if not 0.0 < self.density <= 1.0:
            errors.append(f"density must be in (0, 1], got {self.density}")
        if self.prune not in ("magnitude", "rank", "none"):
            errors.append(f"prune must be one of 'magnitude', 'rank', 'none', got {self.prune!r}")
        if self.scalar_granularity not in ("adapter", "layer"):
            errors.append(f"scalar_granularity must be 'adapter' or 'layer', got {self.scalar_granularity!r}")
        if self.similarity not in ("concat", "layer_mean"):
            errors.append(f"similarity must be 'concat' or 'layer_mean', got {self.similarity!r}")
        if self.adapter_init not in ("shared", "per_task", "inputs"):
            errors.append(f"adapter_init must be 'shared', 'per_task' or 'inputs', got {self.adapter_init!r}")
        if not 0.0 <= self.protect_inputs < 1.0:
            errors.append(f"protect_inputs is an energy fraction in [0, 1), got {self.protect_inputs}")
        if self.protect_ramp is not None:
            if self.protect_inputs == 0.0:
                errors.append("protect_ramp sets the first tasks' protection, which protect_inputs=0 disables: set "
                              "protect_inputs (the energy after the ramp) or drop protect_ramp")
            if not all(0.0 < e < 1.0 for e in self.protect_ramp):
                errors.append(f"protect_ramp holds energy fractions in (0, 1), got {self.protect_ramp}")
        if self.protect_scope not in ("all", "group"):
            errors.append(f"protect_scope must be 'all' or 'group', got {self.protect_scope!r}")
        if self.protect_scope == "group" and not (self.routing and self.similarity_source == "data"):
            errors.append("protect_scope='group' keeps an adapter off its own slot's inputs only, which is safe when "
                          "each input meets its own slot alone and the slot is known at the task's start: set "
                          "routing=True and similarity_source='data'")
        if self.similarity_source not in ("weights", "data"):
            errors.append(f"similarity_source must be 'weights' or 'data', got {self.similarity_source!r}")
        if (self.routing or self.similarity_source == "data") and not self.adapt_from:
            errors.append("routing and similarity_source='data' read the inputs of the adapted part: set adapt_from")
        if self.similarity_threshold is not None and not -1.0 <= self.similarity_threshold <= 1.0:
            errors.append(f"similarity_threshold is a cosine, in [-1, 1]; got {self.similarity_threshold}")
        if self.method not in MERGE_RULES:
            errors.append(f"method must be one of {', '.join(MERGE_RULES.names())} (the registered merge rules; "
                          f"a new one: {MERGE_RULES.how}); got {self.method!r}")
        if errors:
            raise ValueError("Invalid HAMConfig: " + "; ".join(errors) + ".")

    def protect_energy(self, tasks: int) -> float:
        """The input energy a subspace keeps after its ``tasks``-th task: ``protect_ramp[tasks-1]``, then
        ``protect_inputs``."""
        ramp = self.protect_ramp or []
        return ramp[tasks - 1] if 1 <= tasks <= len(ramp) else self.protect_inputs

    @property
    def scaling(self) -> float:
        """LoRA scaling s = lora_alpha / rank."""
        return self.lora_alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

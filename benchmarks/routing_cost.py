"""Inference and training-step cost of routed HAM, side by side in one run (issue 22).

Lite0 (random init: timing does not depend on the weights) at 96 px, HAM from ``--adapt_from`` (``blocks.5``, as
in ``configs/domains_lite0_cpu.yaml``) on its ``conv_pw`` / ``conv_pwl`` / ``conv_head`` layers. Variants, timed
in interleaved repetitions (order rotating) and summarised by medians of per-repetition ratios:

Inference (whole images: prefix + top part), against ``bare``, every slot occupied at its rank cap:

* ``bare``: the plain backbone (what a folded model costs); ``bare_twin``: a second copy (the noise floor);
* ``merged``: HAM's merged inference, unfolded (every slot's delta fused into the frozen weight);
* ``routed``: ``routing=True``: the router's LDA on the pooled input of the adapted part, then each input's own
  slot.

Training step (what a task's step runs: cached prefix activations through the adapted top part, a linear train
head, cross-entropy, backward, Adam on the adapter, its scalars and the head), against ``step_first``:

* ``step_first``: the first task (no slot occupied); ``step_first_twin``: a second copy (the noise floor);
* ``step_cap``: a task after many (every slot at its rank cap, the step on top of its planned slot): what every
  later task costs, however many came before, since the slots are fixed-size.

Prints a table and writes JSON.

    python benchmarks/routing_cost.py --out benchmarks/results/routing_cost_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from pathlib import Path

import torch
from throughput import BenchConfig, median_ratio, time_interleaved  # benchmarks/: the same interleaved timing

from ham_lightning.core.backbones import create_backbone
from ham_lightning.core.config import HAMConfig
from ham_lightning.core.controller import inject
from ham_lightning.core.prefix import split_model


def build(routing: bool, groups: int, x: torch.Tensor, adapt_from: str, seed: int = 0,
          filled: int | None = None) -> torch.nn.Module:
    """Lite0 with HAM from ``adapt_from``; the first ``filled`` (default: every) slots at their rank cap."""
    torch.manual_seed(seed)
    model = create_backbone("tf_efficientnet_lite0", pretrained=False)
    config = HAMConfig(target_modules=["conv_pw", "conv_pwl", "conv_head"], adapt_from=adapt_from, rank=8,
                       max_groups=groups, group_rank=32, routing=routing, similarity_source="data",
                       similarity_threshold=0.01)
    ham = inject(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in range(groups if filled is None else filled):
            for layer in ham.layers.values():
                layer.set_slot(slot, torch.randn(layer.out_features, 32, generator=g) * 0.01,
                               torch.randn(32, layer.in_features, generator=g) * 0.01)
            # router statistics from a share of the timed batch per slot, so its routes spread over every slot
            ham.observe_task([x[slot::groups]], model)
            ham.router.commit(slot)
    return model.eval()


class TrainStep:
    """One training step of a task on cached prefix activations: top part, linear head, loss, backward, Adam."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, adapt_from: str, classes: int = 5) -> None:
        self.split = split_model(model, adapt_from)
        ham = model.ham_controller
        ham.observe_task([x], model)  # plans the task's slot: the step trains on top of it
        ham.reset_adapter(len(ham.history))
        with torch.no_grad():
            self.h = self.split.prefix(x)
        self.y = torch.arange(x.shape[0]) % classes
        self.head = torch.nn.Linear(model.num_features, classes)
        self.model = model.train()
        params = [p for p in model.parameters() if p.requires_grad] + list(self.head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=1e-3)

    def __call__(self) -> None:
        loss = torch.nn.functional.cross_entropy(self.head(self.split.top(self.h)), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapt_from", default="blocks.5")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/routing_cost_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the batch, and so the planned slot of step_cap, the same in every run
    bare = create_backbone("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(args.batch, 3, 96, 96)
    variants = {"bare": bare, "bare_twin": copy.deepcopy(bare),
                "merged": build(False, args.groups, x, args.adapt_from),
                "routed": build(True, args.groups, x, args.adapt_from)}
    names = list(variants)
    timing, cpu = BenchConfig(warmup=3, steps=1), torch.device("cpu")
    with torch.inference_mode():
        times = time_interleaved({k: (lambda m=m: m(x)) for k, m in variants.items()}, timing, cpu, args.repeats)
    ratios = {k: median_ratio(times, k, "bare") for k in names}
    steps = {"step_first": TrainStep(build(True, args.groups, x, args.adapt_from, filled=0), x, args.adapt_from),
             "step_first_twin": TrainStep(build(True, args.groups, x, args.adapt_from, filled=0), x,
                                          args.adapt_from),
             "step_cap": TrainStep(build(True, args.groups, x, args.adapt_from), x, args.adapt_from)}
    step_times = time_interleaved(dict(steps), timing, cpu, args.repeats)
    step_ratios = {k: median_ratio(step_times, k, "step_first") for k in steps}
    routes = variants["routed"].ham_controller.layers["conv_head"].route
    routes = routes.slots if routes is not None else None
    result = {
        "images_per_second": {k: args.batch / statistics.median(v) for k, v in times.items()},
        "ratio_to_bare": ratios,
        "routed_vs_bare_inference_ratio": ratios["routed"], "noise_floor_ratio": ratios["bare_twin"],
        "step_seconds": {k: statistics.median(v) for k, v in step_times.items()},
        "step_ratio_to_first_task": step_ratios,
        "step_at_cap_vs_first_task_ratio": step_ratios["step_cap"],
        "step_noise_floor_ratio": step_ratios["step_first_twin"],
        "planned_slot_of_step_cap": int(steps["step_cap"].model.ham_controller.router.planned),
        "adapt_from": args.adapt_from,
        "slots_used_by_routes": sorted(set(routes.tolist())) if routes is not None else None,
        "batch": args.batch, "groups": args.groups, "repeats": args.repeats, "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "command": "python benchmarks/routing_cost.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
    }
    print(f"{'variant':<10} {'img/s':>8} {'x bare':>8}")
    for k in names:
        print(f"{k:<10} {result['images_per_second'][k]:8.1f} {ratios[k]:8.3f}")
    print(f"\n{'step':<16} {'ms':>8} {'x first':>8}")
    for k, v in result["step_seconds"].items():
        print(f"{k:<16} {1000 * v:8.1f} {step_ratios[k]:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Inference cost of routed HAM against the bare (folded) backbone, side by side in one run (issue 22).

Lite0 (random init: timing does not depend on the weights) at 96 px, HAM on ``blocks.6`` + ``conv_head`` as in
``configs/domains_lite0_cpu.yaml``, every slot occupied at its rank cap. Variants, timed in interleaved
repetitions (order rotating) and summarised by medians of per-repetition ratios to ``bare``:

* ``bare``: the plain backbone (what a folded model costs); ``bare_twin``: a second copy (the noise floor);
* ``merged``: HAM's merged inference, unfolded (every slot's delta fused into the frozen weight);
* ``routed``: ``routing=True``: the router's LDA on the pooled ``blocks.6`` input, then each input's own slot.

Images per second of whole-image inference (prefix + top part). Prints a table and writes JSON.

    python benchmarks/routing_cost.py --out benchmarks/results/routing_cost_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ham_lightning.core.backbones import create_backbone
from ham_lightning.core.config import HAMConfig
from ham_lightning.core.controller import inject


def build(routing: bool, groups: int, x: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_backbone("tf_efficientnet_lite0", pretrained=False)
    config = HAMConfig(target_modules=["conv_pw", "conv_pwl", "conv_head"], adapt_from="blocks.6", rank=8,
                       max_groups=groups, group_rank=32, routing=routing, similarity_source="data",
                       similarity_threshold=0.01)
    ham = inject(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in range(groups):
            for layer in ham.layers.values():
                layer.set_slot(slot, torch.randn(layer.out_features, 32, generator=g) * 0.01,
                               torch.randn(32, layer.in_features, generator=g) * 0.01)
            # router statistics from a share of the timed batch per slot, so its routes spread over every slot
            ham.observe_task([x[slot::groups]], model)
            ham.router.commit(slot)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/routing_cost_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bare = create_backbone("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(args.batch, 3, 96, 96)
    variants = {"bare": bare, "bare_twin": copy.deepcopy(bare), "merged": build(False, args.groups, x),
                "routed": build(True, args.groups, x)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    with torch.inference_mode():
        for model in variants.values():
            for _ in range(3):
                model(x)
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                start = time.perf_counter()
                variants[name](x)
                times[name].append(time.perf_counter() - start)
    ratios = {k: statistics.median(t / b for t, b in zip(times[k], times["bare"])) for k in names}
    routes = variants["routed"].ham_controller.layers["conv_head"].route
    routes = routes.slots if routes is not None else None
    result = {
        "images_per_second": {k: args.batch / statistics.median(v) for k, v in times.items()},
        "ratio_to_bare": ratios,
        "routed_vs_bare_inference_ratio": ratios["routed"], "noise_floor_ratio": ratios["bare_twin"],
        "slots_used_by_routes": sorted(set(routes.tolist())) if routes is not None else None,
        "batch": args.batch, "groups": args.groups, "repeats": args.repeats, "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "command": "python benchmarks/routing_cost.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
    }
    print(f"{'variant':<10} {'img/s':>8} {'x bare':>8}")
    for k in names:
        print(f"{k:<10} {result['images_per_second'][k]:8.1f} {ratios[k]:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

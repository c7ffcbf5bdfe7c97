"""Ablations of HAM's levers: the committed CPU-protocol config with one override each, on held-out training
images (``--data.validation_fraction``), so the defaults are chosen without reading the test split.

Every variant is one ``ham-lightning fit`` of ``--config`` (through `compare.run_method`, like the comparison),
plus the variant's CLI overrides, plus ``--data.validation_fraction=<--validation>``. Results per variant go to
``<out>/<variant>.json``; ``<out>/ablations.json`` and ``ablations.md`` hold the table. A finished variant is not
run again (delete its JSON to redo it).

    python benchmarks/ablate.py --config configs/tiny_imagenet_lite0_cpu.yaml --num_tasks 10 \\
        --out benchmarks/results/tiny_imagenet_lite0_cpu/ablations --only default max_groups_1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import run_method, summary_row  # noqa: E402

#: Issue 22's routing: groups chosen by the data (pooled inputs of the adapted part), each input through its group.
_ROUTED = ["--model.ham.routing=true", "--model.ham.similarity_source=data", "--model.ham.similarity_threshold=0.01"]
#: variant -> (method of compare.py, CLI overrides of the config). ``{T}`` is replaced by the number of tasks.
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "default": ("ham", []),
    "ridge_frozen": ("ridge", []),
    "ncm_frozen": ("ncm", []),
    # ridge's lambda scored on the newest task's held-out rows only (the rule before `lambda_holdout`)
    "ridge_frozen_newest": ("ridge", ['--model.head_kwargs={"lambda_holdout": "newest_task"}']),
    "joint": ("joint", []),  # every class in one task, same passes over the data: the head room of adaptation
    "merge_sum": ("merge_sum", []),
    "merge_sum_protect_0.9": ("merge_sum", ["--model.ham.protect_inputs=0.9"]),
    "merge_sum_protect_0.8": ("merge_sum", ["--model.ham.protect_inputs=0.8"]),
    "ham_paper": ("ham_paper", []),  # groups by the deltas' cosine, every group on every input (design.md)
    "seq_lora": ("seq_lora", []),
    # issue 22
    "data_similarity": ("ham", ["--model.ham.similarity_source=data", "--model.ham.similarity_threshold=0.01"]),
    "routing": ("ham", _ROUTED),
    # routed, each new adapter kept off its own slot's input subspace only, at several strengths
    "protect_group": ("ham", [*_ROUTED, "--model.ham.protect_scope=group"]),
    **{f"protect_group_{p}": ("ham", [*_ROUTED, "--model.ham.protect_scope=group", f"--model.ham.protect_inputs={p}"])
       for p in (0.9, 0.8, 0.7)},
    # ... with the adapters' loss over every seen class (the train head's finished rows frozen), issue 22 item 4
    "protect_group_0.9_seen": ("ham", [*_ROUTED, "--model.ham.protect_scope=group", "--model.ham.protect_inputs=0.9",
                                       "--model.head_mask=seen"]),
    # ... with twice the rank cap of a slot (a domain's slot fills its 32 by the eighth of 10 tasks)
    "protect_group_0.9_rank64": ("ham", [*_ROUTED, "--model.ham.protect_scope=group",
                                         "--model.ham.protect_inputs=0.9", "--model.ham.group_rank=64"]),
    # the committed config with one statistics head over every class instead of one per group slot
    "route_head_off": ("ham", ["--model.route_head=false"]),
    # the config with a protection ramp: a slot's 2nd and 3rd tasks kept off less of its earlier inputs
    **{f"ramp_{'_'.join(r)}": ("ham", [f"--model.ham.protect_ramp=[{','.join(r)}]"])
       for r in (("0.8", "0.8"), ("0.7", "0.8"), ("0.8",))},
    "route_head_protect_0.8": ("ham", ["--model.ham.protect_inputs=0.8"]),  # the config (a head per group) at 0.8
    "route_head_prune_none": ("ham", ["--model.ham.prune=none"]),  # the config (a head per group), nothing pruned
    "route_head_rank16": ("ham", ["--model.ham.rank=16"]),  # the config with twice each task adapter's rank
    "config_rank4": ("ham", ["--model.ham.rank=4"]),  # the config (adapter_init: inputs) with half of it
    "config_no_conv_head": ("ham", ["--model.ham.target_modules=[conv_pw,conv_pwl]"]),  # conv_head left frozen
    # each task adapter's A from its own inputs' principal directions off the protected subspace (InfLoRA / EVA)
    "inputs_init": ("ham", ["--model.ham.adapter_init=inputs"]),
    # groups inside one domain: a slot opened while a task's data similarity to every slot is under 0.5 (two tasks of
    # one domain measured 0.25-0.62, median 0.38), so one domain's tasks spread over the slots; each new adapter
    # off its own slot only
    "split_domain": ("ham", [*_ROUTED, "--model.ham.similarity_threshold=0.5", "--model.ham.protect_scope=group"]),
    "split_domain_route_head": ("ham", [*_ROUTED, "--model.ham.similarity_threshold=0.5",
                                        "--model.ham.protect_scope=group", "--model.route_head=true"]),
    "merge_sum_inputs_init": ("merge_sum", ["--model.ham.adapter_init=inputs"]),  # the config's protection (0.9)
    "inputs_init_protect_0.95_config": ("ham", ["--model.ham.protect_inputs=0.95"]),  # the mixed config (inputs) at 0.95
    **{f"inputs_init_protect_{p}": ("ham", ["--model.ham.adapter_init=inputs", f"--model.ham.protect_inputs={p}"])
       for p in (0.95, 0.98)},
    # issue 22 item 4: earlier classes' features drawn from Gaussian class statistics into each training batch
    # (the train head's finished rows frozen, or trained on the draws too: PASS), every earlier class or, with
    # route_head, the joined slot's
    "pseudo_64": ("ham", ["--model.pseudo_features=64"]),
    "pseudo_64_open": ("ham", ["--model.pseudo_features=64", "--model.freeze_old_rows=false"]),
    "pseudo_16_open": ("ham", ["--model.pseudo_features=16", "--model.freeze_old_rows=false"]),
    "route_head_pseudo_64_open": ("ham", ["--model.route_head=true", "--model.pseudo_features=64",
                                          "--model.freeze_old_rows=false"]),
    # the optimizer's weight decay: L2 added to the gradient (Adam's coupled decay; the Adam configs state 0.01), or
    # decoupled (AdamW)
    "adamw_0.05": ("ham", ["--model.optimizer=torch.optim.AdamW", "--model.optimizer.lr=0.001",
                           "--model.optimizer.weight_decay=0.05"]),
    **{f"adam_wd{w}": ("ham", [f"--model.optimizer.weight_decay={w}"]) for w in ("0", "0.03", "0.1")},
    "routing_protect_off": ("ham", [*_ROUTED, "--model.ham.protect_inputs=0"]),
    "max_groups_1": ("ham", ["--model.ham.max_groups=1"]),
    "max_groups_2": ("ham", ["--model.ham.max_groups=2"]),
    "max_groups_8": ("ham", ["--model.ham.max_groups=8"]),
    "max_groups_per_task": ("ham", ["--model.ham.max_groups={T}", "--model.ham.group_rank=8"]),
    "prune_none": ("ham", ["--model.ham.prune=none"]),
    "prune_rank": ("ham", ["--model.ham.prune=rank"]),
    "density_0.25": ("ham", ["--model.ham.density=0.25"]),
    "density_0.8": ("ham", ["--model.ham.density=0.8"]),
    "group_rank_16": ("ham", ["--model.ham.group_rank=16"]),
    "group_rank_64": ("ham", ["--model.ham.group_rank=64"]),
    "group_scalars_off": ("ham", ["--model.ham.train_group_scalars=false"]),
    "scalars_off": ("ham", ["--model.ham.train_importance=false", "--model.ham.train_group_scalars=false"]),
    "protect_off": ("ham", ["--model.ham.protect_inputs=0"]),  # 0 disables it (null is not a fraction)
    "protect_0.9": ("ham", ["--model.ham.protect_inputs=0.9"]),
    "protect_0.99": ("ham", ["--model.ham.protect_inputs=0.99"]),
    "head_mask_seen": ("ham", ["--model.head_mask=seen"]),
    "lr_3e-4": ("ham", ["--model.optimizer.init_args.lr=0.0003"]),
    "lr_3e-3": ("ham", ["--model.optimizer.init_args.lr=0.003"]),
    "train_head_cosine": ("ham", ["--model.train_head=cosine"]),  # the adapters' loss through a cosine head
    "rescale": ("ham", ["--model.ham.rescale=true"]),  # magnitude-pruned factors scaled by 1/density (DARE)
    "head_linear": ("ham", ["--model.head=linear"]),
    "head_cosine": ("ham", ["--model.head=cosine"]),
    "head_ncm": ("ham", ["--model.head=ncm"]),
    # augmentation drawn afresh every step (no prefix cache: the frozen prefix runs every step) vs cached views
    "per_step_augmentation": ("ham", ["--data.prefix_cache=null"]),
}


def ablate(variants: Sequence[str], config: str, num_tasks: int, out: Path, validation: float | None,
           extra: Sequence[str] = (), runs_dir: Path | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) each variant and write the table; returns its rows."""
    from ham_lightning.lightning.results import results_json

    os.environ.setdefault("WANDB_MODE", "offline")
    unknown = [v for v in variants if v not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(ABLATIONS)}")
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = runs_dir or Path("runs") / "ablate" / out.name
    held_out = [f"--data.validation_fraction={validation}"] if validation else []
    rows, failed = [], {}
    for variant in variants:
        path = out / f"{variant}.json"
        if path.exists():
            results = json.loads(path.read_text())
        else:
            method, overrides = ABLATIONS[variant]
            args = [*extra, *held_out, *(o.replace("{T}", str(num_tasks)) for o in overrides)]
            print(f"[ablate] {variant}: {method} {' '.join(args)}", flush=True)
            try:
                results = run_method(method, num_tasks, config, args, runs_dir / variant, group=f"ablate-{out.name}")
            except (Exception, SystemExit) as err:  # SystemExit: the CLI's parser refused an override
                # One broken variant must not stop the others: it is named in the table and at the end.
                failed[variant] = f"{type(err).__name__}: {err}"
                print(f"[ablate] {variant} FAILED: {failed[variant]}", flush=True)
                continue
            results["variant"] = variant
            path.write_text(results_json(results))
        rows.append({**summary_row(results), "variant": variant,
                     "assignment": (results.get("groups") or {}).get("assignment")})
        print(f"[ablate] {variant}: last {rows[-1]['last_accuracy']:.2f} avg "
              f"{rows[-1]['average_incremental_accuracy']:.2f} forgetting {rows[-1]['forgetting']:.2f}", flush=True)
    every = sorted(out.glob("*.json"))
    table = [summary_row(json.loads(p.read_text())) | {"variant": p.stem} for p in every if p.stem != "ablations"]
    (out / "ablations.json").write_text(json.dumps(
        {"config": config, "num_tasks": num_tasks, "validation_fraction": validation, "rows": table,
         "failed": failed}, indent=2))
    from ham_lightning.report import markdown_table

    lines = markdown_table(["variant", "last acc", "avg inc acc", "forgetting", "wall (s)"], [
        [r["variant"], f"{r['last_accuracy']:.2f}", f"{r['average_incremental_accuracy']:.2f}",
         f"{r['forgetting']:.2f}", f"{r['wall_time_s']:.0f}"] for r in table]
        + [[variant, "failed", "-", "-", "-"] for variant in failed])
    held = f"validation_fraction {validation} of the training images" if validation else "the test split"
    (out / "ablations.md").write_text(f"# Ablations: `{config}`, {num_tasks} tasks, evaluated on {held}\n\n"
                                      + "\n".join(lines) + "\n")
    if failed:
        print(f"[ablate] failed: {', '.join(f'{v} ({e})' for v, e in failed.items())}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_imagenet_lite0_cpu.yaml")
    parser.add_argument("--num_tasks", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tiny_imagenet_lite0_cpu/ablations"))
    parser.add_argument("--validation", type=float, default=0.2,
                        help="held-out fraction of each class's training images to evaluate on (0: the test split)")
    parser.add_argument("--only", nargs="+", default=list(ABLATIONS), help="variants to run (default: all)")
    parser.add_argument("--runs_dir", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="after --: more ham-lightning arguments for every variant")
    args = parser.parse_args(argv)
    ablate(args.only, args.config, args.num_tasks, args.out, args.validation or None, args.extra, args.runs_dir)


if __name__ == "__main__":
    main()

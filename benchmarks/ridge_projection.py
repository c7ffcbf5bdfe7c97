"""The ridge head's random expansion: held-out accuracy of one frozen-feature ridge head for several widths.

One frozen-backbone ``ham-lightning fit`` of ``--config`` on held-out training images records the ridge head's
inputs (`ridge_lambda.capture`); fresh `RidgeHead`s with each ``projection`` (0: none) are fed them task by task,
each choosing its ``lam`` as in every run, and scored on the held-out images. Prints a table and writes JSON.

    python benchmarks/ridge_projection.py --config configs/domains_lite0_cpu.yaml --num_tasks 10 \\
        --out benchmarks/results/domains_lite0_cpu/ridge_projection_T10.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from grouped_ridge import fit
from ridge_lambda import capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/domains_lite0_cpu.yaml")
    parser.add_argument("--num_tasks", type=int, default=10)
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--projections", type=int, nargs="+", default=[0, 2048, 4096, 8192])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/domains_lite0_cpu/ridge_projection_T10.json"))
    args = parser.parse_args()
    data = capture(args.config, args.num_tasks, args.validation, f"ridge_projection_{Path(args.config).stem}")
    x, y = torch.cat([f for f, _ in data["eval"]]), torch.cat([t for _, t in data["eval"]])
    rows = {}
    for projection in args.projections:
        head = fit(data, set(range(len(data["classes"]))), projection=projection)
        accuracy = 100.0 * float((head.eval_logits(head(x)).argmax(1) == y).float().mean())
        rows[projection] = {"accuracy": accuracy, "lam": float(head.lam)}
    print(f"{len(y)} held-out images, frozen features, one head, {args.num_tasks} tasks\n"
          "| projection | accuracy | lam |\n|---:|---:|---:|")
    for projection, row in rows.items():
        print(f"| {projection} | {row['accuracy']:.2f} | {row['lam']:g} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "num_tasks": args.num_tasks,
                                    "validation_fraction": args.validation, "held_out_images": len(y),
                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

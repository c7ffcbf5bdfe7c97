"""One ridge head over every class against one ridge head per domain, on frozen features (issue 22, item 1).

One frozen-backbone fit of ``--config`` on held-out training images records the ridge head's inputs
(`ridge_lambda.capture`); fresh `RidgeHead`s are then fitted on them: one over every task (what every method's head
is), the same with each held-out image's scores kept on its own domain's classes, and one head per domain fed that
domain's tasks only, each image scored by its domain's head (the domain is given here; `GroupedHead` with routing
takes it from the router, which sends 99% of images to their domain's slot). Prints a table and writes JSON.

    python benchmarks/grouped_ridge.py --config configs/domains_lite0_cpu.yaml --num_tasks 10 \\
        --out benchmarks/results/domains_lite0_cpu/grouped_ridge_T10.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from ridge_lambda import capture

from ham_lightning.core.heads import RidgeHead


def fit(data: dict[str, Any], tasks: set[int], **head_kwargs: Any) -> RidgeHead:
    """A fresh ridge head (``head_kwargs`` to `RidgeHead`) fed the recorded batches of ``tasks``, task by task."""
    dim, num_classes = data["train"][0][0].shape[1], 1 + max(max(c) for c in data["classes"])
    head, current = RidgeHead(dim, num_classes, **head_kwargs), None
    for features, labels, task in data["train"]:
        if task not in tasks:
            continue
        if task != current:
            if current is not None:
                head.fit()
            current = task
            head.start_task(data["classes"][task])
        head.update(features, labels)
    head.fit()
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/domains_lite0_cpu.yaml")
    parser.add_argument("--num_tasks", type=int, default=10)
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/domains_lite0_cpu/grouped_ridge_T10.json"))
    args = parser.parse_args()
    run_name = f"grouped_ridge_T{args.num_tasks}"
    data = capture(args.config, args.num_tasks, args.validation, run_name)
    domains = json.loads((Path("runs") / run_name / "results.json").read_text())["task_domains"]
    class_domain = {c: domains[t] for t, cs in enumerate(data["classes"]) for c in cs}
    x, y = torch.cat([f for f, _ in data["eval"]]), torch.cat([t for _, t in data["eval"]])
    image_domain = [class_domain[int(c)] for c in y]
    names = sorted(set(domains))
    own = torch.tensor([[class_domain.get(c) == d for c in range(len(class_domain))] for d in image_domain])

    def report(scores: torch.Tensor) -> dict[str, Any]:
        right = scores.argmax(1) == y
        per = {d: 100.0 * float(right[[i for i, e in enumerate(image_domain) if e == d]].float().mean()) for d in names}
        return {"accuracy": 100.0 * float(right.float().mean()), "per_domain": per}

    one = fit(data, set(range(len(domains))))
    scores = one.eval_logits(one(x))
    rows = {"one head": {**report(scores), "lam": float(one.lam)},
            "one head, scores kept on the image's domain": report(scores.masked_fill(~own, float("-inf")))}
    grouped, lams = torch.full_like(scores, float("-inf")), {}
    for d in names:
        head = fit(data, {t for t, e in enumerate(domains) if e == d})
        mine = torch.tensor([e == d for e in image_domain])
        grouped[mine] = head.eval_logits(head(x[mine]))
        lams[d] = float(head.lam)
    rows["one head per domain"] = {**report(grouped), "lam": lams}
    print(f"{len(y)} held-out images, frozen features, {args.num_tasks} tasks\n| head | accuracy | "
          + " | ".join(names) + " |\n|:---|---:|" + "---:|" * len(names))
    for name, r in rows.items():
        print(f"| {name} | {r['accuracy']:.2f} | " + " | ".join(f"{r['per_domain'][d]:.1f}" for d in names) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "num_tasks": args.num_tasks,
                                    "validation_fraction": args.validation, "held_out_images": len(y),
                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

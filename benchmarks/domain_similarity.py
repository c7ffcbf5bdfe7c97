"""Do the pooled inputs of the adapted part tell a mixed-domain scenario's domains apart? (issue 22)

On held-out training images (``--data.validation_fraction``; the test split is never read), for every pair of
tasks: the squared Mahalanobis distance of their mean pooled ``adapt_from`` inputs under the shared within-task
covariance (what `PrefixRouter`'s data similarity is built on), split into same-domain and cross-domain pairs; and
the share of held-out images that LDA over one slot per domain routes to their own domain. Prints a table and
writes JSON.

    python benchmarks/domain_similarity.py --config configs/domains_lite0_cpu.yaml --num_tasks 20 \\
        --out benchmarks/results/domains_lite0_cpu/domain_similarity_T20.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from ham_lightning.core.routing import PrefixRouter, pool
from ham_lightning.data import ClassIncrementalDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/domains_lite0_cpu.yaml")
    parser.add_argument("--num_tasks", type=int, default=20)
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_cfg = yaml.safe_load(Path(args.config).read_text())["data"]
    data_cfg.pop("epochs_per_task", None)
    data_cfg["num_tasks"] = args.num_tasks
    dm = ClassIncrementalDataModule(**data_cfg, validation_fraction=args.validation)
    dm.setup("fit")
    domains = dm.task_domains or ["all"] * dm.num_tasks

    def pooled(task: int, split: str) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(dm.task_dataset(task, split), batch_size=512)
        return torch.cat([pool(x["prefix"] if isinstance(x, dict) else x) for x, _ in loader]).double()

    train = [pooled(t, "train") for t in range(dm.num_tasks)]
    names = list(dict.fromkeys(domains))
    router = PrefixRouter(train[0].shape[1], len(names))
    for g, name in enumerate(names):  # one slot per domain: the grouping routing should reach
        for t in (t for t in range(dm.num_tasks) if domains[t] == name):
            router.reset_task()
            router.observe(train[t])
            router.commit(g)
    precision = router.precision()
    means = [p.mean(0) for p in train]
    same, cross = [], []
    for i in range(dm.num_tasks):
        for j in range(i):
            d = means[i] - means[j]
            (same if domains[i] == domains[j] else cross).append(float(d @ precision @ d))
    correct = total = 0
    per_domain: dict[str, list[int]] = {n: [0, 0] for n in names}
    for t in range(dm.num_tasks):
        routes = router.route(pooled(t, "test"))
        hit = int((routes == names.index(domains[t])).sum())
        per_domain[domains[t]][0] += hit
        per_domain[domains[t]][1] += len(routes)
        correct, total = correct + hit, total + len(routes)
    result = {
        "config": args.config, "num_tasks": args.num_tasks, "validation_fraction": args.validation,
        "mahalanobis_sq_same_domain": {"min": min(same), "median": float(np.median(same)), "max": max(same)},
        "mahalanobis_sq_cross_domain": {"min": min(cross), "median": float(np.median(cross)), "max": max(cross)},
        "routing_accuracy": correct / total, "held_out_images": total,
        "routing_accuracy_per_domain": {n: h / max(c, 1) for n, (h, c) in per_domain.items()},
    }
    print(f"{'pairs':<14} {'min':>8} {'median':>8} {'max':>8}   (squared Mahalanobis distance of task means)")
    for key, label in (("mahalanobis_sq_same_domain", "same domain"), ("mahalanobis_sq_cross_domain", "cross")):
        r = result[key]
        print(f"{label:<14} {r['min']:8.1f} {r['median']:8.1f} {r['max']:8.1f}")
    print(f"LDA routing to the own domain's slot: {100 * result['routing_accuracy']:.1f}% of {total} held-out images "
          + ", ".join(f"{n} {100 * a:.1f}%" for n, a in result["routing_accuracy_per_domain"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

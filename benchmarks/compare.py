"""Run several continual-learning methods side by side on one scenario, with one seed, backbone and budget.

Every method is one ``ham-lightning fit`` (`ham_lightning.cli.cli`) of the same config with per-method overrides
(`method_args`), so all share the datamodule, class order, backbone, head, optimizer, epochs and evaluation.
The runs log to W&B (offline unless set up online) under one group; their folders go to ``--runs_dir``. The
comparison (``compare.json``, ``compare.md``, plots, and each method's ``results.json``) goes to ``--out``.
A half-done comparison resumes: a method whose ``<out>/T<n>/<method>.json`` exists is not run again.

    python benchmarks/compare.py --config configs/compare_tiny_imagenet_lite0_cpu.yaml --num_tasks 10 \\
        --methods ham seq_lora merge_sum merge_average merge_ties ncm ridge joint \\
        --out benchmarks/results/compare_tiny_imagenet_lite0_cpu -- --data.limit_per_class_train=20

Methods: ``ham`` (the config as is), ``seq_lora``, ``merge_sum``, ``merge_average``, ``merge_ties`` (HAMConfig
.method with one slot and no learned scalars), the training-free anchors ``ncm`` (cosine nearest class mean) and
``ridge`` (random-projection ridge regression, RanPAC-style) on the frozen backbone without adapters, and
``joint`` (``seq_lora`` on one task holding every class, same number of passes over the data; its one-row
matrix is the upper bound, shared by every task count). ``--head ridge`` gives every trained method that head.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: One slot, no learned scalars, no routing: the baselines train on top of their one merged delta, as published
#: (kept off the input subspace of every earlier task: without routing that is the only safe scope), each adapter
#: from LoRA's seeded random init (``adapter_init: inputs`` is HAM's, like a head per group).
_BASELINE = ["--model.ham.max_groups=1", "--model.ham.train_importance=false",
             "--model.ham.train_group_scalars=false", "--model.ham.routing=false",
             "--model.ham.similarity_source=weights", "--model.ham.protect_scope=all", "--model.route_head=false",
             "--model.ham.adapter_init=shared"]
#: CLI overrides that turn the shared config into each method (HAM runs the config unchanged). ``ncm`` and
#: ``ridge`` are the training-free anchors: the frozen backbone (no adapters) under a statistics head, one pass.
METHOD_ARGS: dict[str, list[str]] = {
    "ham": [],
    # The paper's HAM: groups by the deltas' cosine, every group's delta on every input (configs that route)
    "ham_paper": ["--model.ham.routing=false", "--model.ham.similarity_source=weights",
                  "--model.ham.similarity_threshold=null", "--model.ham.protect_scope=all",
                  "--model.route_head=false", "--model.ham.adapter_init=shared"],
    **{m: [f"--model.ham.method={m}", *_BASELINE]
       for m in ("seq_lora", "merge_sum", "merge_average", "merge_ties", "first_session")},
    "ncm": ["--model.adapt=false", "--model.head=ncm", "--data.epochs_per_task=1"],
    "ridge": ["--model.adapt=false", "--model.head=ridge", "--data.epochs_per_task=1"],
    "joint": ["--model.ham.method=seq_lora", *_BASELINE, "--data.num_tasks=1"],
}
METHODS = tuple(METHOD_ARGS)
#: Methods whose head is fixed (a training-free anchor is its head): ``--head`` does not apply to them.
_OWN_HEAD = ("ncm", "ridge")


def method_args(method: str, head: str | None = None) -> list[str]:
    """CLI overrides for ``method``, with every trained method's head set to ``head`` when given."""
    if method not in METHOD_ARGS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    extra = [f"--model.head={head}"] if head and method not in _OWN_HEAD else []
    return [*METHOD_ARGS[method], *extra]


def _read_epochs(config: str | None, extra: Sequence[str]) -> int | None:
    epochs = None
    if config:
        import yaml

        epochs = (yaml.safe_load(Path(config).read_text()).get("data") or {}).get("epochs_per_task")
    for arg in extra:
        if arg.startswith("--data.epochs_per_task="):
            epochs = int(arg.split("=", 1)[1])
    return epochs


def run_method(method: str, num_tasks: int, config: str | None, extra: Sequence[str], runs_dir: Path,
               group: str, head: str | None = None) -> dict[str, Any]:
    """One ``fit`` of ``method``; returns its results.json (with ``method`` set to the compared name)."""
    from ham_lightning.cli import cli

    args = ["fit", *(["--config", config] if config else []), *extra, f"--data.num_tasks={num_tasks}"]
    if method == "joint":
        epochs = _read_epochs(config, extra)
        if epochs:  # the same passes over the data as the whole sequence: E epochs of every class
            args.append(f"--data.epochs_per_task={epochs}")
    args += [*method_args(method, head), f"--run_name={method}", f"--runs_dir={runs_dir}", f"--benchmark={group}",
             "--trainer.enable_checkpointing=false"]
    run_dir = runs_dir / method
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a killed half run: start the method over
    start = time.perf_counter()
    _finish_wandb()  # a run left open in this process would swallow this method's logs (WandbLogger reuses it)
    cli(args)
    _finish_wandb()
    results = json.loads((run_dir / "results.json").read_text())
    results["method"] = method
    results["compare"] = {"head": head, "args": args, "wall_time_s": time.perf_counter() - start, "num_tasks": num_tasks}
    return results


def _finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def summary_row(results: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers for one method."""
    params = results.get("params", {})
    errors = results.get("errors") or {}
    return {
        "method": results["method"],
        "last_accuracy": results.get("last_accuracy"),
        "average_incremental_accuracy": results.get("average_incremental_accuracy"),
        "forgetting": results.get("forgetting"),
        "bwt": results.get("bwt"),
        "trainable_params": params.get("trainable"),
        "stored_params": params.get("stored_adapter"),
        "wall_time_s": results.get("fit_wall_time_s") or results.get("compare", {}).get("wall_time_s"),
        "incremental_accuracy": results.get("incremental_accuracy"),
        # where the last evaluation's wrong predictions went (percent of its images; `error_breakdown.py` has more)
        "errors_within_task": errors.get("within_task"),
        "errors_to_later_task": errors.get("to_later_task"),
        "errors_to_earlier_task": errors.get("to_earlier_task"),
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Last acc, avg incremental acc, forgetting, BWT (percent), the errors within the image's task and into a
    later / an earlier task (percent of the images), trainable and stored params, wall time."""
    from ham_lightning.report import markdown_table as table

    header = ["method", "last acc", "avg inc acc", "forgetting", "BWT", "err. within task",
              "err. to later / earlier task", "trainable params", "stored params", "wall (s)"]
    return "\n".join(table(header, [
        [r["method"], _fmt(r["last_accuracy"]), _fmt(r["average_incremental_accuracy"]), _fmt(r["forgetting"]),
         _fmt(r["bwt"]), _fmt(r.get("errors_within_task")),
         f"{_fmt(r.get('errors_to_later_task'))} / {_fmt(r.get('errors_to_earlier_task'))}",
         _fmt(r["trainable_params"]), _fmt(r["stored_params"]), _fmt(r["wall_time_s"], 0)]
        for r in rows]))


def plot(comparison: dict[str, Any], out: Path) -> list[Path]:
    """Accuracy on seen classes after each task per method (one panel per task count); last accuracy vs tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    counts = sorted(comparison["runs"], key=int)
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.2), squeeze=False)
    for ax, n in zip(axes[0], counts, strict=True):
        for row in comparison["runs"][n]:
            acc = row["incremental_accuracy"] or []
            if row["method"] == "joint":
                ax.axhline(acc[-1], color="black", ls="--", lw=1, label="joint (upper bound)")
            else:
                ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3, label=row["method"])
        ax.set(title=f"{comparison['name']}: {n} tasks", xlabel="tasks learned", ylabel="accuracy on seen classes (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "accuracy_after_each_task.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    if len(counts) > 1:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        methods = {r["method"] for n in counts for r in comparison["runs"][n]}
        for m in sorted(methods):
            xs, ys = [], []
            for n in counts:
                for r in comparison["runs"][n]:
                    if r["method"] == m and r["last_accuracy"] is not None:
                        xs.append(int(n))
                        ys.append(r["last_accuracy"])
            ax.plot(xs, ys, marker="o", label=m, ls="--" if m == "joint" else "-")
        ax.set(xlabel="number of tasks", ylabel="last accuracy (%)", title=comparison["name"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out / "last_accuracy_vs_tasks.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def compare(methods: Sequence[str], num_tasks: Sequence[int], out: Path, config: str | None = None,
            extra: Sequence[str] = (), runs_dir: Path | None = None, name: str | None = None,
            head: str | None = None) -> dict[str, Any]:
    """Run (or resume) the comparison and write ``compare.json``, ``compare.md`` and the plots to ``out``."""
    from ham_lightning.lightning.results import results_json

    os.environ.setdefault("WANDB_MODE", "offline")
    for m in methods:
        method_args(m)  # unknown names fail before anything runs
    out = Path(out)
    name = name or out.name
    runs_dir = Path(runs_dir or Path("runs") / "compare" / name)
    comparison: dict[str, Any] = {"name": name, "config": config, "extra_args": list(extra), "head": head,
                                  "methods": list(methods), "num_tasks": list(num_tasks), "runs": {}}
    for n in num_tasks:
        rows = []
        for m in methods:
            t = 1 if m == "joint" else n  # joint is one task whatever the count: run once, shared
            path = out / f"T{t}" / f"{m}.json"
            if path.exists():
                print(f"[compare] {m} at {t} task(s): done, reusing {path}")
                results = json.loads(path.read_text())
            else:
                print(f"[compare] {m} at {t} task(s): running")
                results = run_method(m, t, config, extra, runs_dir / f"T{t}", group=f"{name}-T{n}", head=head)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(results_json(results))
            rows.append(summary_row(results))
        comparison["runs"][str(n)] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(results_json(comparison))
    md = [f"# {name}", "", f"Config: `{config}`; extra arguments: `{' '.join(extra) or 'none'}`.", ""]
    for n, rows in comparison["runs"].items():
        md += [f"## {n} tasks", "", markdown_table(rows), ""]
    files = plot(comparison, out)
    md += [f"![{f.stem}]({f.name})" for f in files]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    return comparison


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="ham-lightning YAML config shared by every method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num_tasks", nargs="+", type=int, default=[10])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    parser.add_argument("--runs_dir", type=Path, default=None, help="run folders (default runs/compare/<name>)")
    parser.add_argument("--head", default=None, help="head of every trained method (e.g. ridge); default: the config's")
    parser.add_argument("--name", default=None, help="comparison name and W&B group prefix (default: out's name)")
    parser.add_argument("extra", nargs="*", help="after --: more ham-lightning arguments for every method")
    args = parser.parse_args(argv)
    result = compare(args.methods, args.num_tasks, args.out, args.config, args.extra, args.runs_dir, args.name,
                     args.head)
    print((args.out / "compare.md").read_text())
    return result


if __name__ == "__main__":
    main()

"""What a DDP run costs against one process: the same ``ham-lightning fit`` with 1 and with N processes (issue 19).

Each run is the real command in a subprocess (as a user launches it), on the quick start's settings made short
(``--data.num_tasks 2``, 1 epoch a task unless given after ``--``). Order: one process (it also builds the
prefix cache, so its time is not compared), N processes, one process again; the table compares the last two.
Wall time of the command (interpreter start included) and of the fit (results.json's ``fit_wall_time_s``), and
the last accuracy, which DDP must not change beyond noise. On CPU the N processes share the machine's cores
(gloo); on a machine with more than one GPU (``--accelerator gpu``, the default there) each process has its own
(NCCL) and the ratio is the scaling of a real multi-GPU run.

    python benchmarks/ddp_cost.py --out benchmarks/results/ddp_cost_cpu.json
    python benchmarks/ddp_cost.py --devices 8 --out benchmarks/results/ddp_cost_gpu.json  # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHORT = ["--data.num_tasks=2", "--data.epochs_per_task=1", "--trainer.logger=false",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit(runs: Path, name: str, devices: int, accelerator: str, extra: list[str]) -> dict[str, Any]:
    """One ``ham-lightning fit`` with ``devices`` processes; its wall time and results."""
    command = [sys.executable, "-m", "ham_lightning.cli", "fit", *SHORT, f"--runs_dir={runs}", f"--run_name={name}",
               f"--trainer.accelerator={accelerator}", f"--trainer.devices={devices}",
               *(["--trainer.strategy=ddp"] if devices > 1 else []), *extra]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((runs / name / "results.json").read_text())
    return {"processes": devices, "command_wall_s": round(wall, 2), "fit_wall_s": results["fit_wall_time_s"],
            "last_accuracy": results["last_accuracy"], "load_1min_at_start": load,
            "command": " ".join(command[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpus = torch.cuda.device_count()
    parser.add_argument("--devices", type=int, default=gpus if gpus > 1 else 2)
    parser.add_argument("--accelerator", default="gpu" if gpus > 1 else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="after --: more ham-lightning arguments for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        rows = [fit(runs, name, devices, args.accelerator, args.extra)
                for name, devices in (("warm", 1), ("ddp", args.devices), ("single", 1))]
    single, ddp = rows[2], rows[1]
    out = {
        "runs": rows,
        "ddp_vs_single_fit_ratio": round(ddp["fit_wall_s"] / single["fit_wall_s"], 3),
        "ddp_vs_single_command_ratio": round(ddp["command_wall_s"] / single["command_wall_s"], 3),
        "accuracy_difference": round(ddp["last_accuracy"] - single["last_accuracy"], 3),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpus": gpus,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "command": " ".join(sys.argv),
    }
    print(f"{'run':8} {'procs':>5} {'command s':>10} {'fit s':>8} {'last acc':>9} {'load':>5}")
    for name, row in zip(("warm", "ddp", "single"), rows):
        print(f"{name:8} {row['processes']:>5} {row['command_wall_s']:>10.1f} {row['fit_wall_s']:>8.1f} "
              f"{row['last_accuracy']:>9.2f} {row['load_1min_at_start']:>5.1f}")
    print(f"DDP / one process: fit {out['ddp_vs_single_fit_ratio']}x, command {out['ddp_vs_single_command_ratio']}x; "
          f"accuracy {out['accuracy_difference']:+.2f} points")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

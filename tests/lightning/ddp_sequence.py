"""Runs a 2-task sequence on the toy scenario under DDP on CPU processes (gloo) and saves each rank's state.

``python ddp_sequence.py OUT [--head H] [--adapt 0|1] [--protect P] [--routing 0|1] [--route_head 0|1]
[--adapter_init I]``: Lightning's own launcher
starts the second process (as ``--trainer.devices 2`` does). With ``RANK`` / ``WORLD_SIZE`` in the environment
the processes were started outside (as torchrun or SLURM do) and Lightning launches nothing. Each rank writes
``OUT/<tag><head>_rank<r>.pt``: the callback's rows, the last accuracy and the model's whole state. `run` with
``devices=1`` is the one-process reference (test_distributed.py, test_callback.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from toy import MLPBackbone, ToyTaskData, quiet_trainer

import ham_lightning as hl


class BlockBackbone(nn.Module):
    """`MLPBackbone` as ``blocks.0``: a block to adapt from (routing reads its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(MLPBackbone())
        self.num_features = self.blocks[0].num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def run(head: str = "linear", adapt: bool = True, protect: float = 0.0, routing: bool = False,
        devices: int = 2, batch_size: int = 16, route_head: bool = False,
        adapter_init: str = "shared") -> dict[str, Any]:
    """One 2-task fit (``batch_size`` per process); returns this rank's ``{"rank", "tasks", "rows", "last", "state"}``."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    ham: dict[str, Any] = {"protect_inputs": protect, "adapter_init": adapter_init}
    if routing:
        ham.update(routing=True, similarity_source="data", similarity_threshold=0.01, adapt_from="blocks.0")
    config = hl.HAMConfig(target_modules=["fc1", "fc2"], rank=4, max_groups=2, group_rank=8, **ham)
    model = hl.HAMModule(BlockBackbone(), num_classes=4, ham=config, adapt=adapt, head=head, route_head=route_head,
                         optimizer=lambda params: torch.optim.AdamW(params, lr=0.02))
    dm, cb = ToyTaskData(num_tasks=2, epochs_per_task=1, batch_size=batch_size), hl.HierarchicalMergeCallback()
    strategy: Any = "auto"
    if devices > 1:  # find_unused_parameters=False: DDP raises if a trainable parameter gets no grad
        strategy = pl.strategies.DDPStrategy(process_group_backend="gloo", find_unused_parameters=False)
    trainer = quiet_trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[cb], devices=devices,
                            strategy=strategy)
    trainer.fit(model, dm)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"rank": trainer.global_rank, "tasks": cb.current_task, "rows": cb.rows,
            "last": cb.results()["last_accuracy"], "state": state}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--head", default="linear", help="a head, or several comma-separated (one fit each)")
    parser.add_argument("--adapt", type=int, default=1)
    parser.add_argument("--protect", type=float, default=0.0)
    parser.add_argument("--routing", type=int, default=0)
    parser.add_argument("--route_head", type=int, default=0)
    parser.add_argument("--adapter_init", default="shared")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    for head in args.head.split(","):  # several fits in one process: only when launched from outside
        result = run(head, bool(args.adapt), args.protect, bool(args.routing), route_head=bool(args.route_head),
                     adapter_init=args.adapter_init)
        torch.save(result, args.out / f"{args.tag}{head}_rank{result['rank']}.pt")
    if torch.distributed.is_initialized():
        # Join gloo's threads before the interpreter exits: left to the exit, one CI run's rank 0 aborted there
        # ("terminate called without an active exception", exit -6) after every fit had finished and saved.
        torch.distributed.destroy_process_group()

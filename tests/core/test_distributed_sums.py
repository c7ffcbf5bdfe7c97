"""`ham_lightning.core.distributed` on two gloo processes: the sums every rank ends with, and the guard that the
ranks walk the same batches (`check_same`), which must raise on the rank that disagrees and on the others.
(Named apart from tests/lightning/test_distributed.py, the whole sequences under DDP: test modules need unique
basenames here.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ham_lightning.core.distributed import check_same, gather_rows, summed, world


def _worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    out: dict[str, object] = {"world": list(world())}
    try:
        check_same(3.5, "the batch labels")  # the same on both: passes
        out["same"] = "passed"
        try:
            check_same(float(rank), "the batch labels")  # rank 0 has 0, rank 1 has 1
            out["differ"] = "passed"
        except RuntimeError as err:
            out["differ"] = str(err)
        t = torch.tensor([float(rank + 1)])
        with summed([t]):
            pass
        out["summed"] = float(t)
        cpu = torch.device("cpu")
        out["gathered"] = gather_rows(torch.full((rank + 1, 2), float(rank)), cpu).tolist()
        out["gathered_none"] = gather_rows(torch.ones(1, 2) if rank == 0 else None, cpu).tolist()
    finally:
        dist.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(out))


def test_ranks_agree_on_sums_and_the_guard_names_the_fix(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [[0, 2], [1, 2]]
    for r in results:
        assert r["same"] == "passed"
        assert "disagree on the batch labels" in r["differ"] and "seeded torch.Generator" in r["differ"]
        assert r["summed"] == 3.0  # 1 + 2 on both ranks
        assert r["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # rank 0's one row, then rank 1's two
        assert r["gathered_none"] == [[1.0, 1.0]]  # a rank with no rows adds none


def test_one_process_is_a_no_op() -> None:
    assert world() == (0, 1)
    check_same(1.0, "anything")  # nothing to compare with: no error
    t = torch.tensor([2.0])
    with summed([t]):
        t += 1
    assert float(t) == 3.0

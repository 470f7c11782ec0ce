"""The multi-process test helper: gloo workers fork, NCCL workers spawn (a forked child of a
parent that initialised CUDA cannot use it), and a spawned worker runs a collective and
returns its result the way a forked one does."""
import torch
import torch.distributed as dist

from support.distributed import START_METHODS, run_workers


def _sum_worker(rank, world):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return {"sum": value}


def test_nccl_workers_are_spawned_and_spawned_workers_run():
    assert START_METHODS == {"gloo": "fork", "nccl": "spawn"}
    torch.cuda.is_available()  # what test_gpu.py's skip condition does in the parent
    for method in ("fork", "spawn"):
        ranks = run_workers(_sum_worker, 2, start_method=method, timeout=120)
        assert [float(r["sum"][0]) for r in ranks] == [3.0, 3.0], method

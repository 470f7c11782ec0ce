"""Run a function on N fork-started gloo ranks, with a hard timeout.

Failures in multi-process code here are usually hangs, so every launch has a deadline after
which all workers are killed and the test fails with what each rank reported.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import time
import socket
import traceback

import numpy as np
import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_numpy(obj):
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()  # numpy has no bf16
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def _worker(rank, world_size, port, fn, args, queue, backend):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        dist.barrier()
        queue.put((rank, "ok", _to_numpy(result)))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# gloo workers are forked (about 1 s a launch); NCCL workers are spawned: a forked child of a
# parent that has initialised CUDA (pytest's skip conditions call torch.cuda.is_available())
# fails with "Cannot re-initialize CUDA in forked subprocess"
START_METHODS = {"gloo": "fork", "nccl": "spawn"}


def run_workers(fn, world_size: int, *args, timeout: float = 90.0, backend: str = "gloo",
                start_method: str | None = None):
    """fn(rank, world_size, *args) on each rank; returns the per-rank results (tensors come
    back as numpy arrays). Raises with every rank's traceback on error or timeout. ``nccl``:
    one GPU a rank. ``start_method``: default START_METHODS[backend] (a spawned worker imports
    ``fn``'s module, so ``fn`` and ``args`` must be picklable)."""
    ctx = mp.get_context(start_method or START_METHODS[backend])
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, backend))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    first_error = None
    try:
        while len(results) + len(errors) < world_size:
            if errors and time.monotonic() > first_error + 5:  # let the other ranks report their cause
                break
            try:
                rank, status, payload = queue.get(timeout=0.5)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead and not errors:
                    errors.append(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                    first_error = time.monotonic()
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(results))}")
                    break
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                first_error = time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def shard(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The rank's contiguous slice of the last (vocabulary) dimension."""
    width = full.shape[-1] // world_size
    return full[..., rank * width : (rank + 1) * width].contiguous()


def unshard(parts) -> np.ndarray:
    return np.concatenate(parts, axis=-1)

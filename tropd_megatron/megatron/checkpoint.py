"""Checkpoints with Megatron's dist_checkpointing: loadable at another TP / PP layout.

Layout under a run's checkpoint root:
    step_00000012/        model + optimizer shards, trainer.json, rng_rank*.pt
    .incomplete_step_*/   a save in progress (or killed): never read
    latest                the name of the newest complete checkpoint, replaced last
A save writes into ``.incomplete_step_N``, renames it to ``step_N`` once every rank has
finished, then atomically replaces ``latest``: a process killed at any point leaves the
previous checkpoint and pointer intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.tensor_parallel import get_cuda_rng_tracker

LATEST = "latest"
TRAINER_STATE = "trainer.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    model_state = model.sharded_state_dict()
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    return state


def save_checkpoint(root, step: int, model, optimizer=None, scheduler=None, trainer_state: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. ``model`` is the bare GPTModel (``ddp.module``);
    ``trainer_state`` is JSON data saved beside (for example the data position)."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    partial = root / f".incomplete_{final.name}"
    rank = dist.get_rank()
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)  # left by a save that was killed
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(partial))
    torch.save({"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()},
               partial / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        meta = {"step": step, "world_size": dist.get_world_size(), "trainer": trainer_state or {}}
        if scheduler is not None:
            meta["scheduler"] = scheduler.state_dict()
        _write_atomic(partial / TRAINER_STATE, json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, final.name)
    dist.barrier()
    return final


def latest_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def checkpoint_metadata(path) -> dict:
    """A complete checkpoint's metadata (step, world size, trainer state) without loading it."""
    meta_file = Path(path) / TRAINER_STATE
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    return json.loads(meta_file.read_text())


def load_checkpoint(path, model, optimizer=None, scheduler=None) -> dict:
    """Load into ``model`` (and optimizer / scheduler when given) at this run's TP / PP
    layout, whatever layout saved it; returns the saved metadata (step, trainer state).
    RNG states are restored only when the world size matches the saving run's."""
    path = Path(path)
    meta = checkpoint_metadata(path)
    try:
        loaded = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
    except (Exception, CheckpointException) as e:  # truncated or missing shards (CheckpointException is a BaseException)
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        raise ValueError(f"{path}: unreadable checkpoint ({type(cause).__name__}: {str(cause)[:200]}); restore "
                         f"it, or point {path.parent / LATEST} at an earlier step_* folder") from e
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
    if meta.get("world_size") == dist.get_world_size() and rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    return meta

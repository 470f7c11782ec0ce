"""Checkpoints with Megatron's dist_checkpointing: loadable at another TP / PP layout.

Layout under a run's checkpoint root:
    step_00000012/        model + optimizer shards, checkpoint.json, rng_rank*.pt
    .incomplete_step_*/   a save in progress (or killed): never read
    .deleting_step_*/     an old checkpoint being deleted (``keep_last``): never read
    latest                the name of the newest complete checkpoint, replaced last
A save writes into ``.incomplete_step_N``, renames it to ``step_N`` once every rank has
finished, then atomically replaces ``latest``: a process killed at any point leaves the
previous checkpoint and pointer intact.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from .compat import HAVE_TE
from .groups import ModelGroups
from ..run_config import OPTIMIZER_FORMATS
from .. import ConfigError

LATEST = "latest"
# step, layout, LR schedule, the trainer's state; written last (not metadata.json: dist_checkpointing's own)
METADATA = "checkpoint.json"
LEGACY_METADATA = "trainer.json"  # its name in checkpoints written before 2026-12-03, still read


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


def _optimizer_parts(optimizer):
    """(Megatron optimizer, the torch optimizer inside it) of each part of a Megatron
    optimizer (chained or not)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(part, "optimizer", None) is not None:
            yield part, part.optimizer


def _torch_optimizers(optimizer):
    """The torch optimizers inside a Megatron optimizer (chained or not)."""
    return [inner for _, inner in _optimizer_parts(optimizer)]


def start_optimizer_state(optimizer) -> None:
    """Give Adam the state it has before its first step (zero moments; torch's step 0) where it
    has none yet: the trainer calls it once before anything is sized, so that the moments hold
    their memory from the start (Adam creates them lazily, at the first update, after the KV
    caches were sized from the free memory), and every save calls it. Megatron's distributed
    optimizer reads every parameter's ``step`` from torch Adam's state to save (a run whose first
    updates were all skipped) and to load into a fresh optimizer; TransformerEngine's and apex's
    FusedAdam keep the step in their param_groups and get Megatron's own ``init_state_fn``."""
    for part, inner in _optimizer_parts(optimizer):
        if isinstance(inner, torch.optim.Adam):  # AdamW is one
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                          "exp_avg_sq": torch.zeros_like(p)}
        elif getattr(part, "init_state_fn", None) is not None:
            part.init_state_fn(inner, part.config)  # fills only parameters without state


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """Torch Adam's step count after Megatron's distributed optimizer loaded a checkpoint.

    Without TransformerEngine's or apex's Adam, the distributed optimizer keeps torch's
    per-parameter ``step`` in the parameter state it saves, but loads it as one tensor shared
    by every parameter, left at the fresh optimizer's value (torch would also advance the
    shared tensor once per parameter per update). The checkpoint records the count in its
    param_groups; each parameter gets its own tensor of it (tested: resume is bitwise)."""
    parts = [loaded] if "optimizer" in loaded else [loaded[k] for k in sorted(k for k in loaded if isinstance(k, int))]
    for inner, part in zip(_torch_optimizers(optimizer), parts):
        steps = {g["step"] for g in part.get("optimizer", {}).get("param_groups", []) if "step" in g}
        if isinstance(inner, torch.optim.Adam) and len(steps) == 1:
            step = float(steps.pop())
            for state in inner.state.values():
                state["step"] = torch.tensor(step)


@contextlib.contextmanager
def _steps_kept_while_loading():
    """Megatron's fully reshardable format holds no ``step`` per parameter, but its loader
    copies every key of torch Adam's per-parameter state (``step`` included) from it: the
    parameter keeps its own step here, and ``_restore_adam_steps`` sets the count after."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        own = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]].get("step")
        if own is not None and "step" not in tensors:
            tensors = {**tensors, "step": own}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _sharded_state(model, optimizer, is_loading: bool, optimizer_format: str) -> dict:
    # replicas are told apart by the model's own data-parallel group (a teacher's may differ
    # from the global one, which the default reads)
    model_state = model.sharded_state_dict(metadata={"dp_cp_group": ModelGroups.of(model).pgs.dp_cp})
    state = {"model": model_state}
    if optimizer is not None:
        start_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format})
    return state


def _layer_kind() -> str:
    """Which layers wrote the weights: their parameter names differ (TransformerEngine fuses
    each layer norm into the next linear layer: ``linear_qkv.layer_norm_weight`` against the
    local spec's ``input_layernorm.weight``)."""
    return "transformer_engine" if HAVE_TE else "local"


def _layout(model) -> dict:
    groups = ModelGroups.of(model)
    return {"tensor": groups.tensor, "pipeline": groups.pipeline}


def save_checkpoint(root, step: int, model, optimizer=None, scheduler=None, trainer_state: Optional[dict] = None,
                    optimizer_format: str = "dp_reshardable", keep_last: int = 0, keep_every: int = 0) -> Path:
    """Collective: every rank calls it. ``model`` is the bare GPTModel (``ddp.module``);
    ``trainer_state`` is JSON data saved beside (for example the data position);
    ``optimizer_format``: see OPTIMIZER_FORMATS; ``keep_last`` / ``keep_every``: see
    ``prune_checkpoints`` (0: keep every checkpoint)."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ConfigError(f"checkpoint.optimizer_format={optimizer_format!r}; expected one of {OPTIMIZER_FORMATS}")
    root = Path(root)
    final = root / f"step_{step:08d}"
    partial = root / f".incomplete_{final.name}"
    rank = dist.get_rank()
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)  # left by a save that was killed
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, False, optimizer_format), str(partial))
    torch.save({"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()},
               partial / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        meta = {"step": step, "world_size": dist.get_world_size(), "layout": _layout(model), "layers": _layer_kind(),
                "optimizer_format": optimizer_format, "trainer": trainer_state or {}}
        if scheduler is not None:
            meta["scheduler"] = scheduler.state_dict()
        _write_atomic(partial / METADATA, json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, final.name)
        if keep_last:
            prune_checkpoints(root, keep_last, keep_every)
    dist.barrier()
    return final


DELETING = ".deleting_"


def prune_checkpoints(root, keep_last: int, keep_every: int = 0) -> list[str]:
    """Delete all but the newest ``keep_last`` step folders under ``root``, keeping steps that
    are multiples of ``keep_every`` (0: none) and always the folder ``latest`` names; returns
    the folders deleted. Call it after ``latest`` points at a complete checkpoint. Each folder
    is first renamed (atomic) to ``.deleting_step_N``, which nothing reads, so a kill midway
    leaves only whole checkpoints under their names; such leftovers go at the next prune."""
    root = Path(root)
    current = (root / LATEST).read_text().strip()
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    keep = {p.name for p in steps[-keep_last:]} | {current}
    if keep_every:
        keep |= {p.name for p in steps if int(p.name.split("_")[1]) % keep_every == 0}
    deleted = []
    for path in steps:
        if path.name not in keep:
            os.rename(path, root / (DELETING + path.name))
            deleted.append(path.name)
    _fsync_dir(root)
    for leftover in sorted(root.glob(DELETING + "*")):
        shutil.rmtree(leftover)
    return deleted


def latest_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if _metadata_file(path) is None:
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def _metadata_file(path) -> Optional[Path]:
    """A complete checkpoint's metadata file (either name), None for an incomplete one."""
    return next((Path(path) / name for name in (METADATA, LEGACY_METADATA) if (Path(path) / name).exists()), None)


def checkpoint_metadata(path) -> dict:
    """A complete checkpoint's metadata (step, world size, trainer state) without loading it."""
    meta_file = _metadata_file(path)
    if meta_file is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {METADATA})")
    return json.loads(meta_file.read_text())


# What a checkpoint's pickled parts may name: torch.distributed.checkpoint's metadata records
# and torch's own value types. PyTorch reads a checkpoint's ``.metadata`` with plain
# ``pickle.load`` and its byte items with ``torch.load(weights_only=False)``, either of which
# would run code placed in a crafted checkpoint: check_safe_to_load reads them first, here.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))):
            return getattr(torch, name)
        raise _Refused(f"it names {module}.{name}, which a checkpoint has no reason to")


class _Refused(pickle.UnpicklingError):
    pass


def check_safe_to_load(path) -> None:
    """Refuse (ValueError naming the file) a checkpoint folder whose pickled parts would
    import anything but checkpoint metadata and plain values: ``.metadata`` files through an
    allow-list, byte items and ``common.pt`` through ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    for file in sorted(path.glob("*.metadata")) + sorted(path.glob(".metadata")):
        try:
            metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
        except _Refused as e:
            raise ConfigError(f"{file}: refused to load: {e}") from None
        except Exception as e:
            raise _unreadable(path, e) from e
        for index, info in getattr(metadata, "storage_data", {}).items():
            if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
                continue
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            if len(raw) < info.length:
                raise _unreadable(path, EOFError(f"{info.relative_path} ends before item {index.fqn}"))
            _load_weights_only(io.BytesIO(raw), f"{path / info.relative_path} item {index.fqn}", path)
    if (path / "common.pt").exists():
        _load_weights_only(path / "common.pt", str(path / "common.pt"), path)


def _load_weights_only(source, name: str, folder: Path) -> None:
    try:
        torch.load(source, weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses: a global outside its allow-list
        raise ConfigError(f"{name}: refused to load: {str(e).splitlines()[0][:300]}") from None
    except Exception as e:
        raise _unreadable(folder, e) from e


def _unreadable(path: Path, cause: BaseException) -> ConfigError:
    return ConfigError(f"{path}: unreadable checkpoint ({type(cause).__name__}: {str(cause)[:200]}); restore it, "
                      f"or point {path.parent / LATEST} at an earlier step_* folder")


def load_checkpoint(path, model, optimizer=None, scheduler=None) -> dict:
    """Load into ``model`` (and optimizer / scheduler when given) at this run's TP / PP
    layout, whatever layout saved it; returns the saved metadata (step, trainer state).
    RNG states are restored only when the world size matches the saving run's."""
    path = Path(path)
    meta = checkpoint_metadata(path)
    check_safe_to_load(path)
    optimizer_format = meta.get("optimizer_format", "dp_reshardable")
    if meta.get("layers", _layer_kind()) != _layer_kind():  # checkpoints from before this record: not checked
        raise ConfigError(
            f"{path} was written with {meta['layers']} layers and this run builds {_layer_kind()} ones "
            f"(TransformerEngine {'imports' if HAVE_TE else 'does not import'} here): their parameter names differ "
            "(TE fuses each layer norm into the next linear layer). Export it on the machine that wrote it "
            "(python -m launch.export ...) and load the Hugging Face folder, which reads into either")
    saved, now = meta.get("layout"), _layout(model)
    if optimizer is not None and optimizer_format == "dp_reshardable" and saved and saved != now:
        raise ConfigError(
            f"{path}: its optimizer state was saved at tensor {saved['tensor']} x pipeline {saved['pipeline']} "
            f"(checkpoint.optimizer_format=dp_reshardable), which loads at any data-parallel size but at that layout "
            f"only; this run is tensor {now['tensor']} x pipeline {now['pipeline']}. Resume at the saved layout (and "
            "set checkpoint.optimizer_format=fully_reshardable there to change it at the next checkpoint), or load "
            "the weights alone as student.checkpoint in a new checkpoint.dir")
    try:
        loaded = dist_checkpointing.load(_sharded_state(model, optimizer, True, optimizer_format), str(path))
    except (Exception, CheckpointException) as e:  # truncated or missing shards (CheckpointException is a BaseException)
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        raise _unreadable(path, cause) from e
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        # the distributed optimizer copies into its (leaf) main params in place: no autograd
        with torch.no_grad(), _steps_kept_while_loading():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
    if meta.get("world_size") == dist.get_world_size() and rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    return meta

"""The whole run's configuration checked against its world size before anything is built.

Each dataclass checks its own fields when it is made; ``validate`` checks what spans several
of them (a 70B teacher takes minutes to load: a mistake found after that costs a launch).
Every launcher calls it first (``launch.train``, the Slurm script through it, ``launch.nemo``,
``launch.plan``, ``launch.evaluate``, ``launch.export``) and so does the trainer. Pure
arithmetic on the configuration: no torch, no Megatron.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from .planner import kv_cache_bytes, kv_token_bytes, request_lengths
from .platform import TE_THD_FP32_MIN, Platform
from . import ConfigError

if TYPE_CHECKING:
    from .run_config import RunConfig


def problems(cfg: RunConfig, world_size: int, platform: Platform | None = None) -> list[str]:
    """Every cross-setting problem of ``cfg`` on ``world_size`` processes, each naming the keys
    and values involved (empty: the run can start). ``platform``: the machine's CUDA and
    kernel libraries (``Platform.detect()``); None: those checks are skipped (planning a run
    for another machine)."""
    out = [] if platform is None else platform_problems(cfg, platform)
    p, t, r, s = cfg.parallel, cfg.teacher_parallel, cfg.rollout, cfg.rollout.sampling
    layout = p.tensor * p.pipeline
    if world_size % layout:
        out.append(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
                   f"{p.tensor} x {p.pipeline}")
    else:
        dp = world_size // layout
        if cfg.schedule.prompts_per_step % dp:
            out.append(f"schedule.prompts_per_step={cfg.schedule.prompts_per_step} is not divisible by the "
                       f"data-parallel size {dp} (world size {world_size} / tensor {p.tensor} x pipeline {p.pipeline})")
    own_layout = cfg.teacher_on_own_layout
    if own_layout and world_size % (t.tensor * t.pipeline):
        out.append(f"world size {world_size} is not divisible by the teacher's tensor x pipeline = {t.tensor} x "
                   f"{t.pipeline} (teacher.parallel.tensor / pipeline; null: the student's)")
    shapes_divide = True
    for what, layout_of in (("teacher", t), ("student", p)):
        try:
            layout_of.check(layout_of.tensor * layout_of.pipeline, getattr(cfg, what).model)
        except ValueError as e:
            keys = "teacher.parallel" if what == "teacher" and own_layout else "parallel"
            out.append(f"{what}.model at {keys}.tensor={layout_of.tensor} x pipeline={layout_of.pipeline}: {e}")
            shapes_divide = False
    if own_layout and cfg.objective.selected().teacher_input == "logits":
        out.append(f"objective.name={cfg.objective.name} hands the teacher's logits shard to the loss, which needs "
                   f"the teacher on the student's layout (moving it would move a vocabulary row a token): set "
                   f"teacher.parallel.tensor / pipeline to null (or to parallel's {p.tensor} / {p.pipeline})")
    student, teacher = cfg.student.model, cfg.teacher.model
    if student.vocab_size != teacher.vocab_size:
        out.append(f"teacher.model.vocab_size={teacher.vocab_size} and student.model.vocab_size={student.vocab_size} "
                   "differ: teacher and student must share one tokenizer's vocabulary")
    if cfg.optim.warmup_steps and cfg.optim.warmup_steps >= cfg.schedule.steps:
        out.append(f"optim.warmup_steps={cfg.optim.warmup_steps} must be below schedule.steps={cfg.schedule.steps}")
    if cfg.optim.spike_factor and student.dtype == "fp16":
        out.append("optim.spike_factor is not supported with student.model.dtype=fp16 (its loss scaler would "
                   "count every guarded step twice): use bf16, or optim.spike_factor=0")
    prompt = cfg.data.max_prompt_tokens
    longest = prompt + s.max_new_tokens
    for what, model in (("student", student), ("teacher", teacher)):  # the teacher scores whole rollouts
        if longest > model.max_sequence_length:
            out.append(f"data.max_prompt_tokens={prompt} + rollout.sampling.max_new_tokens={s.max_new_tokens} = "
                       f"{longest} exceeds {what}.model.max_sequence_length={model.max_sequence_length}")
    if cfg.eval.path and prompt + cfg.eval_max_new_tokens() > student.max_sequence_length:
        out.append(f"data.max_prompt_tokens={prompt} + eval.max_new_tokens={cfg.eval_max_new_tokens()} exceeds "
                   f"student.model.max_sequence_length={student.max_sequence_length}")
    if r.packing and r.row_tokens and r.row_tokens < longest - 1:
        out.append(f"rollout.row_tokens={r.row_tokens} cannot hold a rollout of data.max_prompt_tokens + "
                   f"rollout.sampling.max_new_tokens - 1 = {longest - 1} tokens: raise it or set 0 (that length)")
    if s.top_k > 1 and s.top_p < 1:
        out.append(f"rollout.sampling.top_k={s.top_k} and top_p={s.top_p}: Megatron's sampler takes one of them")
    objective = cfg.objective.selected()
    guided = r.writes_prefixes
    if guided and not objective.uses_prefix_mask:
        out.append(f"rollout.prefix_share_start / _end and prefix_tokens_start / _end ask for teacher prefixes, which "
                   f"objective.name={cfg.objective.name} does not train on (prefix guidance is TrOPD's)")
    if r.engine.name == "static" and p.sequence_parallel and max(p.tensor, t.tensor if guided else 1) > 1:
        out.append("rollout.engine.name=static does not support parallel.sequence_parallel (Megatron's static "
                   "engine allows it for MoE models only): use the dynamic engine, or sequence_parallel=false")
    if r.engine.name == "dynamic" and not r.engine.kv_cache_free_fraction and shapes_divide:
        lengths = request_lengths(cfg)
        for what, model, at in (("student", student, p), ("teacher", teacher, t))[: 2 if guided else 1]:
            message = kv_buffer_problem(model, r.engine, at.tensor, at.pipeline, lengths[what])
            if message:
                out.append(f"{what}: {message}")
    wandb = cfg.logging.wandb
    if wandb.project and wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        out.append(f"logging.wandb.project={cfg.logging.wandb.project} needs the wandb package (pip install wandb), "
                   "or logging.wandb.project=null")
    return out


def platform_problems(cfg: RunConfig, platform: Platform) -> list[str]:
    """What the GPU path would assert (or fail on) deep inside megatron-core or TE, and what
    needs a GPU."""
    r = cfg.rollout
    if not platform.cuda:
        if r.engine.name == "dynamic" and r.engine.kv_cache_free_fraction:
            return [f"rollout.engine.kv_cache_free_fraction={r.engine.kv_cache_free_fraction} needs a GPU (a share of "
                    "its free memory); set rollout.engine.kv_cache_gib"]
        return []
    out = []
    generating = (("student", cfg.student.model),) + ((("teacher", cfg.teacher.model),) if r.writes_prefixes else ())
    if r.engine.name == "dynamic":
        if problem := platform.dynamic_engine_problem():
            out.append(problem)
        for what, model in generating:  # its KV cache takes the model's dtype; flash-attn takes fp16 / bf16
            if model.dtype == "fp32":
                out.append(f"{what}.model.dtype=fp32 with rollout.engine.name=dynamic on a GPU: the engine's KV "
                           "cache takes the model's dtype and flash-attn only fp16 / bf16; set "
                           f"{what}.model.dtype=bf16, or rollout.engine.name=static")
    te = platform.transformer_engine
    if r.packing and te is not None and te < TE_THD_FP32_MIN:
        for what, model in (("student", cfg.student.model), ("teacher", cfg.teacher.model)):
            if model.dtype == "fp32":
                out.append(f"rollout.packing=true with {what}.model.dtype=fp32 needs TransformerEngine >= "
                           f"{'.'.join(map(str, TE_THD_FP32_MIN))} (packed rows run as THD sequences, which TE "
                           f"{'.'.join(map(str, te))} has no fp32 attention backend for); use bf16, "
                           "rollout.packing=false, or a newer TE")
    return out


def kv_buffer_problem(model, engine, tensor: int, pipeline: int, request_tokens: int, gib: float | None = None):
    """Why a dynamic engine's KV buffer cannot run (too small for one request of the longest
    length, which would never finish), or None."""
    block = engine.block_size_tokens * kv_token_bytes(model, tensor=tensor, pipeline=pipeline)
    held = kv_cache_bytes(model, engine, tensor=tensor, pipeline=pipeline, request_tokens=request_tokens,
                          buffer_gib=gib)
    needed = -(-request_tokens // engine.block_size_tokens)
    if held // block - 1 >= needed:  # one block is the engine's dummy
        return None
    size = engine.kv_cache_gib if gib is None else gib
    return (f"rollout.engine.kv_cache_gib={size:.4g} holds {max(held // block - 1, 0)} KV blocks of "
            f"{engine.block_size_tokens} tokens ({block / 2**20:.3g} MiB each); one request of {request_tokens} "
            f"tokens needs {needed}: raise it to at least {(needed + 1) * block / 2**30:.3g}")


def validate(cfg: RunConfig, world_size: int, platform: Platform | None = None) -> None:
    """Raise ValueError listing every problem ``problems`` finds."""
    found = problems(cfg, world_size, platform)
    if found:
        raise ConfigError("the configuration cannot run:\n  " + "\n  ".join(found))

"""One training iteration: rollouts -> teacher signal -> training step."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from ..data import PromptStream
from ..losses import ObjectiveConfig
from ..seeds import stream_seed
from .inference import Generator
from .rollout import RolloutConfig, collect_rollouts, to_microbatches
from .step import StepResult, Student, train_step


@dataclass(frozen=True)
class IterationSettings:
    """What every iteration of a run reads and none changes, built once by the trainer:
    the rollout settings, the objective, ``prompts_per_step`` (global), the tokenizer's
    ``vocab_size``, ``total_steps`` (schedules over training) and the run's ``seed``."""
    rollout: RolloutConfig
    objective: ObjectiveConfig
    prompts_per_step: int
    vocab_size: int
    total_steps: int
    seed: int = 0


@dataclass
class IterationResult:
    step: StepResult
    metrics: dict  # the step's metrics plus rollout statistics
    seconds: dict  # rollout / teacher / student / optimizer / total


def run_iteration(student: Student, teacher, student_generator: Generator, teacher_generator: Generator,
                  prompts: PromptStream, settings: IterationSettings, step: int) -> IterationResult:
    """Each data-parallel rank rolls out its share of ``settings.prompts_per_step`` prompts
    (every rank draws the same batch from the stream, so the stream's position stays in step)."""
    rollout, objective, prompts_per_step = settings.rollout, settings.objective, settings.prompts_per_step
    total_steps, seed = settings.total_steps, settings.seed
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if prompts_per_step % dp_size:
        raise ValueError(f"prompts_per_step={prompts_per_step} must be divisible by data-parallel size {dp_size}")
    batch = prompts.next_batch(prompts_per_step)[dp_rank::dp_size]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rollouts = collect_rollouts(student_generator, teacher_generator, [p.token_ids for p in batch], rollout,
                                step=step, total_steps=total_steps, seed=stream_seed(seed, "rollouts", rank=dp_rank))
    kv_bytes = max(g.stats.kv_bytes for g in (student_generator, teacher_generator))  # before the release
    for generator in (student_generator, teacher_generator):
        generator.release()  # the KV caches give way to the training step's activations
    t1 = time.perf_counter()
    microbatches = to_microbatches(
        rollouts, rollout.micro_batch_size, student_generator.eos_id, pack=rollout.packing,
        row_tokens=rollout.packed_row_tokens(prompts.config.max_prompt_tokens),
        same_shape=parallel_state.get_pipeline_model_parallel_world_size() > 1,
        multiple_of=parallel_state.get_tensor_model_parallel_world_size() if student.model.config.sequence_parallel
        else 1, rollout_logprobs=objective.uses_rollout_logprobs)
    ends = (student_generator.eos_id, teacher_generator.eos_id)
    result = train_step(student, teacher, microbatches, objective, vocab_size=settings.vocab_size, step=step,
                        total_steps=total_steps, dense=objective.teacher_input == "logits",
                        end_tokens=ends if ends[0] != ends[1] else None)
    generated = sum(len(r.prefix) + len(r.continuation) for r in rollouts)
    seconds = {"rollout": t1 - t0, **result.seconds}
    seconds["total"] = sum(seconds.values())
    metrics = dict(result.metrics)
    metrics.update(
        rollouts=len(rollouts), response_tokens=generated,
        response_length=generated / max(len(rollouts), 1),
        stopped_fraction=sum(r.stopped for r in rollouts) / max(len(rollouts), 1),
        prefixed_fraction=sum(bool(r.prefix) for r in rollouts) / max(len(rollouts), 1),
        skipped_long_prompts=prompts.skipped_too_long,
        tokens_per_second=generated / max(seconds["total"], 1e-9),
        kv_bytes=kv_bytes,  # this rank's largest KV cache in use while generating
    )
    if torch.cuda.is_available():  # this rank's peak over rollouts and training (no allocator statistics on CPU)
        metrics["memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return IterationResult(result, metrics, seconds)

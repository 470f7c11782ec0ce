"""On-policy rollouts with teacher-prefix guidance, and their packing into micro-batches.

A rollout is prompt + teacher prefix (possibly empty) + the student's continuation. For a
share of the rollouts the teacher writes the first L response tokens; share and L decay
linearly over training from their start to their end values.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from ..seeds import stream_seed
from .inference import EngineConfig, Generator, SamplingConfig
from .step import MicroBatch


@dataclass
class RolloutConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # the inference engine of both generators (student and teacher), its concurrency and KV memory
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollouts_per_prompt: int = 4
    micro_batch_size: int = 4
    prefix_share_start: float = 0.0  # share of rollouts that start with a teacher prefix
    prefix_share_end: float = 0.0
    prefix_tokens_start: int = 0  # L, the teacher prefix length
    prefix_tokens_end: int = 0

    def __post_init__(self):
        for name in ("prefix_share_start", "prefix_share_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"RolloutConfig.{name}={getattr(self, name)}; must be in [0, 1]")
        for name in ("prefix_tokens_start", "prefix_tokens_end"):
            if not 0 <= getattr(self, name) < self.sampling.max_new_tokens:
                raise ValueError(f"RolloutConfig.{name}={getattr(self, name)}; must be in [0, max_new_tokens)")
        if min(self.rollouts_per_prompt, self.micro_batch_size) < 1:
            raise ValueError("RolloutConfig.rollouts_per_prompt and micro_batch_size must be >= 1")

    def prefix_schedule(self, step: int, total_steps: int) -> tuple[float, int]:
        """(share, L) at ``step``: linear from the start values to the end values."""
        t = min(max(step, 0), total_steps) / max(total_steps, 1)
        share = self.prefix_share_start + t * (self.prefix_share_end - self.prefix_share_start)
        length = round(self.prefix_tokens_start + t * (self.prefix_tokens_end - self.prefix_tokens_start))
        return share, length


@dataclass
class Rollout:
    prompt: list
    prefix: list  # teacher-written response tokens
    continuation: list  # the student's tokens
    continuation_logprobs: list  # the student's log-probs of them at rollout time
    stopped: bool


def collect_rollouts(student: Generator, teacher: Generator, prompts: list, config: RolloutConfig, *,
                     step: int, total_steps: int, seed: int) -> list[Rollout]:
    """``rollouts_per_prompt`` rollouts of each prompt (lists of token ids), reproducible from
    ``seed`` (this rank's rollout seed) and ``step``. Every rank of a model-parallel group must
    call it with the same prompts."""
    expanded = [p for p in prompts for _ in range(config.rollouts_per_prompt)]
    share, length = config.prefix_schedule(step, total_steps)
    prefixes = [[] for _ in expanded]
    if length > 0 and share > 0:
        order = list(range(len(expanded)))
        random.Random(stream_seed(seed, "prefix_choice", step=step)).shuffle(order)
        ids = sorted(order[: round(share * len(expanded))])
        outs = teacher.generate([expanded[i] for i in ids], replace(config.sampling, max_new_tokens=length),
                                seed=stream_seed(seed, "teacher_prefix", step=step))
        for i, g in zip(ids, outs):
            # a finished prefix ends with the student's end token (the families' may differ)
            prefixes[i] = g.tokens[:-1] + [student.eos_id] if g.stopped else g.tokens
    rollouts = [None] * len(expanded)
    pending = []
    for i, prompt in enumerate(expanded):
        if prefixes[i] and prefixes[i][-1] == student.eos_id:  # the teacher finished the answer
            rollouts[i] = Rollout(prompt, prefixes[i], [], [], True)
        else:
            pending.append(i)
    if pending:  # the continuation budget is what the prefix left of max_new_tokens
        outs = student.generate([expanded[i] + prefixes[i] for i in pending], config.sampling,
                                seed=stream_seed(seed, "student_rollout", step=step),
                                max_new_tokens=[config.sampling.max_new_tokens - len(prefixes[i]) for i in pending])
        for i, g in zip(pending, outs):
            rollouts[i] = Rollout(expanded[i], prefixes[i], g.tokens, g.logprobs, g.stopped)
    return rollouts


def to_microbatches(rollouts: list[Rollout], micro_batch_size: int, pad_id: int) -> list[MicroBatch]:
    """Pack rollouts into micro-batches of one shape [micro_batch_size, S] (pipeline schedules
    need equal shapes): tokens = sequence[:-1], labels = sequence[1:]; loss_mask marks labels
    that are response tokens, prefix_mask the teacher's, rollout_logprobs the student's
    log-probs at its own tokens. Rows beyond the rollouts are fully masked padding."""
    seqs = [r.prompt + r.prefix + r.continuation for r in rollouts]
    S = max(len(s) for s in seqs) - 1
    n = -(-len(rollouts) // micro_batch_size) * micro_batch_size
    tokens = torch.full((n, S), pad_id, dtype=torch.long)
    labels = torch.full((n, S), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, S)
    prefix_mask = torch.zeros(n, S, dtype=torch.bool)
    rollout_logprobs = torch.zeros(n, S)
    for row, (r, seq) in enumerate(zip(rollouts, seqs)):
        seq = torch.tensor(seq)
        tokens[row, : len(seq) - 1] = seq[:-1]
        labels[row, : len(seq) - 1] = seq[1:]
        start = len(r.prompt) - 1  # label position of the first response token
        cont = start + len(r.prefix)
        loss_mask[row, start : cont + len(r.continuation)] = 1.0
        prefix_mask[row, start:cont] = True
        rollout_logprobs[row, cont : cont + len(r.continuation)] = torch.tensor(r.continuation_logprobs)
    has_prefix = bool(prefix_mask.any())  # no prefix_mask at all when no rollout has one
    return [
        MicroBatch(tokens[i : i + micro_batch_size], labels[i : i + micro_batch_size], loss_mask[i : i + micro_batch_size],
                   prefix_mask[i : i + micro_batch_size] if has_prefix else None,
                   rollout_logprobs[i : i + micro_batch_size])
        for i in range(0, n, micro_batch_size)
    ]

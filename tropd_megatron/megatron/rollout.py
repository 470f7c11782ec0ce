"""On-policy rollouts with teacher-prefix guidance, and their packing into micro-batches.

A rollout is prompt + teacher prefix (possibly empty) + the student's continuation. For a
share of the rollouts the teacher writes the first L response tokens; share and L decay
linearly over training from their start to their end values.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from ..losses import sequence_token_keys
from ..seeds import stream_seed
from ..config.rollout import RolloutConfig
from .inference import Generator
from .step import MicroBatch


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


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` in rows of at most ``capacity`` tokens: longest first, each into
    the first row with room (first-fit decreasing: at most 11/9 of the optimal row count + 1)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def to_microbatches(rollouts: list[Rollout], micro_batch_size: int, pad_id: int, *, pack: bool = False,
                    row_tokens: int | None = None, same_shape: bool = True, multiple_of: int = 1,
                    rollout_logprobs: bool = True) -> list[MicroBatch]:
    """Micro-batches of ``micro_batch_size`` rows: tokens = sequence[:-1], labels =
    sequence[1:]; loss_mask marks labels that are response tokens (the end token included),
    prefix_mask the teacher's (None when no rollout has a prefix), rollout_logprobs the
    student's log-probs at its own tokens (None with ``rollout_logprobs`` False: an objective
    without importance ratios),
    trust_keys each rollout's stochastic-trust keys (computed on the rollout alone, so both
    layouts draw the same mask).

    Padded (``pack`` False): one rollout a row, every row as long as the longest rollout.
    Packed: rollouts bin-packed into rows of at most ``row_tokens`` tokens (first-fit
    decreasing), each attending only to itself (``MicroBatch.segments``); a rollout longer than
    a row is an error. ``same_shape`` (what pipeline parallelism needs): every micro-batch
    [micro_batch_size, S] with one S (packed: ``row_tokens``); else each micro-batch as long as
    its longest row. Lengths are rounded up to ``multiple_of`` (sequence parallelism: the TP
    size). Rows beyond the rollouts are fully masked padding."""
    seqs = [r.prompt + r.prefix + r.continuation for r in rollouts]
    lengths = [len(s) - 1 for s in seqs]
    if pack:
        if row_tokens is None or row_tokens < max(lengths):
            raise ValueError(f"a rollout of {max(lengths)} tokens does not fit a packed row of rollout.row_tokens="
                             f"{row_tokens}: set it to at least max_prompt_tokens + max_new_tokens - 1")
        rows = _first_fit_decreasing(lengths, row_tokens)
    else:
        rows = [[i] for i in range(len(rollouts))]
    rows += [[] for _ in range(-len(rows) % micro_batch_size)]  # whole micro-batches
    fixed = (row_tokens if pack else max(lengths)) if same_shape else None
    out = []
    for start in range(0, len(rows), micro_batch_size):
        group = rows[start : start + micro_batch_size]
        S = fixed or max(sum(lengths[i] for i in row) for row in group)
        S = -(-S // multiple_of) * multiple_of
        out.append(_microbatch([[(rollouts[i], seqs[i]) for i in row] for row in group], S, pad_id, pack,
                               prefixes=any(r.prefix for r in rollouts), logprobs=rollout_logprobs))
    return out


def _microbatch(rows: list, S: int, pad_id: int, packed: bool, *, prefixes: bool, logprobs: bool) -> MicroBatch:
    """One micro-batch of rows, each a list of (rollout, sequence) placed one after another."""
    n = len(rows)
    tokens = torch.full((n, S), pad_id, dtype=torch.long)
    labels = torch.full((n, S), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, S)
    prefix_mask = torch.zeros(n, S, dtype=torch.bool)
    rollout_logprobs = torch.zeros(n, S)
    trust_keys = torch.zeros(n, S, dtype=torch.long)
    segments = torch.zeros(n, S, dtype=torch.long)
    for row, placed in enumerate(rows):
        at = 0
        for segment, (r, seq) in enumerate(placed, 1):
            seq = torch.tensor(seq)
            span = slice(at, at + len(seq) - 1)
            tokens[row, span], labels[row, span] = seq[:-1], seq[1:]
            mask = torch.zeros(len(seq) - 1)
            start = len(r.prompt) - 1  # label position of the first response token
            cont = start + len(r.prefix)
            mask[start : cont + len(r.continuation)] = 1.0
            loss_mask[row, span] = mask
            prefix_mask[row, at + start : at + cont] = True
            rollout_logprobs[row, at + cont : at + cont + len(r.continuation)] = torch.tensor(r.continuation_logprobs)
            trust_keys[row, span] = sequence_token_keys(seq[1:][None], mask[None])[0]
            segments[row, span] = segment
            at += len(seq) - 1
    return MicroBatch(tokens, labels, loss_mask, prefix_mask if prefixes else None,
                      rollout_logprobs if logprobs else None, segments=segments if packed else None,
                      trust_keys=trust_keys)

"""Primitives on a tensor-parallel vocabulary shard.

Logits arrive as the local shard ``[..., V/TP]`` of Megatron's vocab-parallel output layer.
Nothing here gathers logits across ranks: every collective moves O(tokens) or
O(tokens * k) numbers. Padded vocabulary columns (global id >= ``vocab_size``) are treated
as -inf. Arithmetic runs in fp32 (fp64 for fp64 inputs) whatever the input dtype.

Two kinds of functions:
- ``shard_statistics`` and ``gather_logprobs``: one packed all-gather per call, and a
  custom autograd Function that keeps no working copy of the shard between forward and
  backward (the softmax is recomputed in backward). The objectives are built on these.
- ``log_softmax``, ``entropy``, ``dense_forward_kl``, ``dense_reverse_kl``: composed from
  differentiable collectives, for users and for dense objectives; simple, not memory-lean.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .collectives import (
    ProcessGroup,
    VocabShard,
    all_gather_stack,
    all_reduce_for_replicated_loss,
    all_reduce_for_shard_math,
    all_reduce_max,
    group_size,
)

# Rows per chunk are chosen so one fp32 temporary holds about this many elements (4 MiB):
# neither forward nor backward materialises a full-shard fp32 working copy.
CHUNK_ELEMENTS = 1 << 20
# Global ids travel packed with float statistics; fp32 holds integers exactly below 2**24.
MAX_PACKED_ID = 1 << 24


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class VocabStats(NamedTuple):
    """Full-vocabulary statistics per token, identical on every tensor-parallel rank.

    max [T]; lse [T]; entropy [T]; logits_at_ids [T, m]; topk_ids [T, k] int64 (global ids, sorted by
    descending logit); topk_logits [T, k]; nonfinite [T] bool (a non-finite logit among the
    real vocabulary columns; the other fields are then meaningless for that token).
    """

    max: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    logits_at_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logits: torch.Tensor
    nonfinite: torch.Tensor


@torch.no_grad()
def shard_statistics(
    logits: torch.Tensor,
    ids: Optional[torch.Tensor],
    shard: VocabShard,
    group: ProcessGroup,
    *,
    topk: int = 0,
    check_finite: bool = False,
) -> VocabStats:
    """Logsumexp, entropy, logits at global ``ids`` and merged top-k, in one all-gather.

    Args:
        logits: [T, V/TP] local shard, any float dtype.
        ids: [T, m] global vocabulary ids (any integer dtype, each < vocab_size) or None.
        topk: k of the merged top-k (0 for none); k <= vocab_size.
        check_finite: also flag tokens with a NaN/inf logit among the real columns.

    Per rank r the local max m_r, s_r = sum exp(z - m_r) and n_r = sum exp(z - m_r)(z - m_r)
    travel together; lse = M + log sum_r s_r exp(m_r - M) and, with w_r the rank's share of
    the probability mass, H = sum_r w_r (lse - m_r - n_r / s_r).
    """
    rows, width = logits.shape
    dtype = working_dtype(logits.dtype)
    real = logits[:, : shard.valid]
    local_max = torch.full((rows,), float("-inf"), dtype=dtype, device=logits.device)
    sum_exp = torch.zeros(rows, dtype=dtype, device=logits.device)
    ent_num = torch.zeros(rows, dtype=dtype, device=logits.device)
    nonfinite = torch.zeros(rows, dtype=dtype, device=logits.device)
    if shard.valid > 0:
        local_max = real.amax(dim=-1).to(dtype)  # amax: max(dim) also computes indices, ~9x slower
        for rs in _row_chunks(rows, shard.valid):
            shifted = torch.sub(real[rs], local_max[rs, None]).to(dtype)
            expd = shifted.exp()
            sum_exp[rs] = expd.sum(-1)
            ent_num[rs] = expd.mul_(shifted).sum(-1)
            if check_finite:
                nonfinite[rs] = (~torch.isfinite(real[rs])).any(-1).to(dtype)

    packs = [local_max[:, None], sum_exp[:, None], ent_num[:, None], nonfinite[:, None]]
    m = 0 if ids is None else ids.shape[-1]
    if m:
        local_ids = ids.long() - shard.start
        owned = (local_ids >= 0) & (local_ids < shard.valid)
        picked = logits.gather(1, local_ids.clamp(0, width - 1)).to(dtype)
        packs.append(torch.where(owned, picked, torch.zeros_like(picked)))
    local_k = min(topk, shard.size)
    if local_k:
        if shard.valid >= local_k:
            values, idx = real.topk(local_k, dim=-1)
        else:  # fewer real columns here than k: pad with -inf entries that never win
            values = torch.full((rows, local_k), float("-inf"), dtype=logits.dtype, device=logits.device)
            idx = torch.zeros((rows, local_k), dtype=torch.long, device=logits.device)
            if shard.valid:
                values[:, : shard.valid], idx[:, : shard.valid] = real.topk(shard.valid, dim=-1)
        packs += [values.to(dtype), (idx + shard.start).to(dtype)]

    gathered = all_gather_stack(torch.cat(packs, dim=-1), group)  # [TP, T, 4 + m + 2k']
    g_max, g_sum, g_num, g_bad = (gathered[..., i] for i in range(4))
    top = g_max.max(dim=0).values
    mass = g_sum * torch.exp(g_max - top)  # a rank with no real columns has s_r = 0
    total = mass.sum(0)
    lse = top + total.log()
    share = mass / total
    per_rank = torch.where(g_sum > 0, lse - g_max - g_num / g_sum.clamp_min(1e-300), torch.zeros_like(g_sum))
    entropy = (share * per_rank).sum(0)
    logits_at_ids = gathered[..., 4 : 4 + m].sum(0)
    if local_k:
        cand_values = gathered[..., 4 + m : 4 + m + local_k].permute(1, 0, 2).reshape(rows, -1)
        cand_ids = gathered[..., 4 + m + local_k :].permute(1, 0, 2).reshape(rows, -1)
        topk_logits, pos = cand_values.topk(topk, dim=-1)
        topk_ids = cand_ids.gather(1, pos).long()
    else:
        topk_logits = gathered.new_zeros((rows, 0))
        topk_ids = torch.zeros((rows, 0), dtype=torch.long, device=logits.device)
    return VocabStats(top, lse, entropy, logits_at_ids, topk_ids, topk_logits, g_bad.sum(0) > 0)


class _GatherLogProbs(torch.autograd.Function):
    """log p(ids) from a vocab shard; backward recomputes the softmax from the saved input.

    Forward keeps only a reference to the input logits and O(T * m) statistics, so between
    forward and backward the loss holds no copy of the shard. Backward, per token:
    d log p_j / d z_u = 1[u = id_j] - p_u, so dL/dz = scatter(G) - rowsum(G) * softmax(z),
    computed chunk by chunk on the local shard with no collective (G is replicated on every
    TP rank) and written into a buffer of the input's dtype, or with ``inplace`` into the
    input's own storage (the logits are consumed, as Megatron's cross entropy does).
    """

    @staticmethod
    def forward(ctx, logits, ids, shard, group, inplace):
        stats = shard_statistics(logits, ids, shard, group)
        ctx.save_for_backward(logits, ids, stats.lse)
        ctx.shard, ctx.inplace = shard, inplace
        entropy = stats.entropy
        ctx.mark_non_differentiable(entropy)
        return stats.logits_at_ids - stats.lse[:, None], entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        logits, ids, lse = ctx.saved_tensors
        shard = ctx.shard
        grad = logits if ctx.inplace else torch.empty_like(logits)
        grad[:, shard.valid :] = 0
        if shard.valid > 0:
            grad_logprobs = grad_logprobs.to(lse.dtype)
            coef = -grad_logprobs.sum(-1)
            local_ids = ids.long() - shard.start
            owned = (local_ids >= 0) & (local_ids < shard.valid)
            local_ids = local_ids.clamp(0, shard.valid - 1)
            sparse = torch.where(owned, grad_logprobs, 0.0)
            for rs in _row_chunks(logits.shape[0], shard.valid):
                rows = grad[rs, : shard.valid]
                # compute in the output rows when they are already in the working dtype
                out = rows if rows.dtype == lse.dtype else None
                chunk = torch.sub(logits[rs, : shard.valid], lse[rs, None], out=out)
                chunk.exp_().mul_(coef[rs, None]).scatter_add_(1, local_ids[rs], sparse[rs])
                if out is None:
                    rows.copy_(chunk)
        return grad, None, None, None, None


def gather_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    tp_group: ProcessGroup = None,
    vocab_size: Optional[int] = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of global token ids, and the full-vocabulary entropy.

    Args:
        logits: [..., V/TP] local vocabulary shard (any float dtype).
        ids: [..., m] global ids (< vocab_size) aligned with the leading dims of logits.
        inplace_backward: write the gradient into ``logits``' storage (saves one shard of
            memory; the logits hold the gradient after backward).
    Returns:
        logprobs [..., m] (differentiable w.r.t. logits, memory-lean backward) and
        entropy [...] (no gradient), both in fp32 (fp64 for fp64 logits).
    """
    lead = logits.shape[:-1]
    if ids.shape[:-1] != lead:
        raise ValueError(f"ids has shape {tuple(ids.shape)}; expected {tuple(lead)} + (m,) to match logits")
    shard = VocabShard.of(logits.shape[-1], tp_group, vocab_size)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    logprobs, ent = _GatherLogProbs.apply(
        flat_logits, ids.reshape(-1, ids.shape[-1]), shard, tp_group, inplace_backward
    )
    return logprobs.reshape(ids.shape), ent.reshape(lead)


def vocab_parallel_topk(
    logits: torch.Tensor,
    k: int,
    *,
    tp_group: ProcessGroup = None,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens over the full vocabulary, merged across ranks (no gradient).

    Returns global ids [..., k] (int64) and their log-probabilities [..., k], sorted by
    descending probability. Moves O(tokens * k) numbers.
    """
    shard = VocabShard.of(logits.shape[-1], tp_group, vocab_size)
    check_topk(k, shard)
    flat = logits.reshape(-1, logits.shape[-1])
    stats = shard_statistics(flat, None, shard, tp_group, topk=k)
    lead = logits.shape[:-1]
    return stats.topk_ids.reshape(*lead, k), (stats.topk_logits - stats.lse[:, None]).reshape(*lead, k)


def check_topk(k: int, shard: VocabShard) -> None:
    if not 0 <= k <= shard.vocab_size:
        raise ValueError(f"topk={k} must be in [0, vocab_size={shard.vocab_size}]")
    if shard.vocab_size > MAX_PACKED_ID:
        raise ValueError(f"vocab_size={shard.vocab_size} exceeds {MAX_PACKED_ID} (ids travel packed in fp32)")


def log_softmax_stats(
    logits: torch.Tensor, *, tp_group: ProcessGroup = None, vocab_size: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary max and logsumexp per token (no gradient): ([...], [...])."""
    shard = VocabShard.of(logits.shape[-1], tp_group, vocab_size)
    stats = shard_statistics(logits.reshape(-1, logits.shape[-1]), None, shard, tp_group)
    return stats.max.reshape(logits.shape[:-1]), stats.lse.reshape(logits.shape[:-1])


def log_softmax(
    logits: torch.Tensor, *, tp_group: ProcessGroup = None, vocab_size: Optional[int] = None
) -> torch.Tensor:
    """Local shard of the full-vocabulary log-softmax [..., V/TP]; padded columns are -inf.

    The max shift is detached (log-softmax does not depend on it); the sum of exponentials
    is reduced with a summing backward because it feeds per-shard math.
    """
    shard = VocabShard.of(logits.shape[-1], tp_group, vocab_size)
    x = logits.to(working_dtype(logits.dtype))
    real = x[..., : shard.valid]
    local_max = real.detach().amax(-1) if shard.valid else x.new_full(x.shape[:-1], float("-inf"))
    top = all_reduce_max(local_max, tp_group)
    sum_exp = torch.exp(real - top[..., None]).sum(-1)
    lse = top + all_reduce_for_shard_math(sum_exp, tp_group).log()
    pad = x.new_full((*x.shape[:-1], shard.size - shard.valid), float("-inf"))
    return torch.cat([real - lse[..., None], pad], dim=-1)


def _reduce_over_real_columns(local_terms: torch.Tensor, shard: VocabShard, group: ProcessGroup) -> torch.Tensor:
    return all_reduce_for_replicated_loss(local_terms[..., : shard.valid].sum(-1), group)


def entropy(logits: torch.Tensor, *, tp_group: ProcessGroup = None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Full-vocabulary entropy per token [...], differentiable."""
    shard = VocabShard.of(logits.shape[-1], tp_group, vocab_size)
    logp = log_softmax(logits, tp_group=tp_group, vocab_size=vocab_size)[..., : shard.valid]
    return -_reduce_over_real_columns(logp.exp() * logp, shard, tp_group)


def _xlogy_diff(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """q (log q - log p), with 0 where q = 0 (no NaN from 0 * -inf)."""
    q = logq.exp()
    return torch.where(q > 0, q * (logq - logp), torch.zeros_like(q))


def _dense_kl(student_logits, teacher_logits, tp_group, vocab_size, *, reverse: bool) -> torch.Tensor:
    shard = VocabShard.of(student_logits.shape[-1], tp_group, vocab_size)
    logp = log_softmax(student_logits, tp_group=tp_group, vocab_size=vocab_size)[..., : shard.valid]
    logq = log_softmax(teacher_logits, tp_group=tp_group, vocab_size=vocab_size)[..., : shard.valid]
    terms = _xlogy_diff(logp, logq) if reverse else _xlogy_diff(logq, logp)
    return _reduce_over_real_columns(terms, shard, tp_group)


def dense_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: ProcessGroup = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """KL(p_T || p_S) per token over the full vocabulary [...], differentiable."""
    return _dense_kl(student_logits, teacher_logits, tp_group, vocab_size, reverse=False)


def dense_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: ProcessGroup = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """KL(p_S || p_T) per token over the full vocabulary [...], differentiable."""
    return _dense_kl(student_logits, teacher_logits, tp_group, vocab_size, reverse=True)


@torch.no_grad()
def swap_token_logits(logits: torch.Tensor, a: int, b: int, *, tp_group: ProcessGroup = None) -> torch.Tensor:
    """``logits`` [..., V/TP] with the columns of token ids ``a`` and ``b`` exchanged.

    Reads a teacher whose end-of-turn token (``b``) differs from the student's (``a``) in the
    student's ids: its probability of ending the turn lands on the student's end token. The
    two columns may sit on different shards: one all-reduce of [..., 2]. No gradient (it
    serves the frozen teacher); a new tensor, ``logits`` is unchanged.
    """
    shard = VocabShard.of(logits.shape[-1], tp_group, None)
    owned = [shard.start <= t < shard.start + shard.size for t in (a, b)]
    columns = logits.new_zeros((*logits.shape[:-1], 2))
    for j, t in enumerate((a, b)):
        if owned[j]:
            columns[..., j] = logits[..., t - shard.start]
    if group_size(tp_group) > 1:
        torch.distributed.all_reduce(columns, group=tp_group)
    out = logits.clone()
    for j, t in enumerate((a, b)):
        if owned[j]:
            out[..., t - shard.start] = columns[..., 1 - j]
    return out

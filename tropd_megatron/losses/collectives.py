"""Tensor-parallel collectives with explicit backward rules.

Getting the backward of a collective wrong gives the right loss with wrong gradients, so
each rule is stated where it is written. ``group=None`` means unsharded: every function
is then the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]


def group_size(group: ProcessGroup) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class VocabShard:
    """Where a rank's slice of the vocabulary sits.

    Megatron splits the (padded) vocabulary into equal contiguous slices, rank r holding
    global ids [start, start + size). Ids >= ``vocab_size`` are padding: ``valid`` is how
    many leading columns of the local slice are real tokens.
    """

    start: int
    size: int
    valid: int
    vocab_size: int

    @staticmethod
    def of(local_size: int, group: ProcessGroup, vocab_size: Optional[int]) -> "VocabShard":
        start = group_rank(group) * local_size
        padded = local_size * group_size(group)
        if vocab_size is None:
            vocab_size = padded
        if not 0 < vocab_size <= padded:
            raise ValueError(
                f"vocab_size={vocab_size} must be in [1, {padded}] (the local logits width "
                f"{local_size} x tensor-parallel size {group_size(group)})"
            )
        return VocabShard(start, local_size, max(0, min(local_size, vocab_size - start)), vocab_size)


# torch 2.13 renamed all_gather_into_tensor (deprecated there); clusters may run older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_stack(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[...] -> [TP, ...], every rank's tensor in rank order. No gradient."""
    if group is None:
        return tensor.unsqueeze(0)
    tensor = tensor.contiguous()
    out = tensor.new_empty((group_size(group) * tensor.shape[0],) + tuple(tensor.shape[1:]))
    _all_gather_single(out, tensor, group=group)
    return out.view(group_size(group), *tensor.shape)


class _AllReduceSumBackwardSum(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradients over ranks.

    For a reduction whose result feeds per-shard math: every rank's local term influences
    the result on every rank, so its gradient is the sum of all ranks' incoming gradients.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllReduceSumBackwardIdentity(torch.autograd.Function):
    """Sum over ranks; backward passes the incoming gradient through unchanged.

    For a reduction whose result feeds a loss replicated on every rank: each rank already
    holds the full gradient of the replicated loss, and summing would multiply it by TP.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_for_shard_math(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Differentiable sum over ranks whose result is consumed by per-shard math."""
    return tensor if group is None else _AllReduceSumBackwardSum.apply(tensor, group)


def all_reduce_for_replicated_loss(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Differentiable sum over ranks whose result is consumed by a replicated loss."""
    return tensor if group is None else _AllReduceSumBackwardIdentity.apply(tensor, group)


def all_reduce_max(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Max over ranks, no gradient (used only as a numerically stabilising shift)."""
    out = tensor.detach().clone()
    if group is not None:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out

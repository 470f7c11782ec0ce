"""Per-token KL estimators on already-gathered log-probabilities (no collectives).

Everything here works on small tensors: the sampled token's log-ratio [...] or log-probs at
the teacher's top-k ids [..., k], gathered from the sharded vocabulary by
``vocab.gather_logprobs`` / ``vocab.shard_statistics``.
"""
from __future__ import annotations

import math

import torch

TOPK_KL_VARIANTS = ("plain", "renormalised", "tail")
# Smallest student tail mass the tail-bucket variant takes the log of: keeps the loss and
# its gradient finite when the student puts (numerically) all its mass on the top-k.
TAIL_MASS_FLOOR = 1e-6


def kl_estimators(log_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K1, K2, K3 estimates of KL(p_S || p_T) from y ~ p_S.

    Args:
        log_ratio: [...] r = log p_T(y) - log p_S(y) of student samples y.
    Returns:
        k1 = -r (unbiased, high variance), k2 = r^2 / 2, k3 = exp(r) - 1 - r (unbiased, >= 0).
    """
    return -log_ratio, 0.5 * log_ratio.square(), torch.expm1(log_ratio) - log_ratio


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_forward_kl(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, variant: str = "plain"
) -> torch.Tensor:
    """Forward KL restricted to the teacher's top-k tokens.

    Args:
        student_logprobs: [..., k] log p_S at the teacher's top-k ids (differentiable).
        teacher_logprobs: [..., k] log p_T at those ids (treated as constants).
        variant:
          ``plain``        sum_K q_v (log q_v - log p_v) (the EOPD / TrOPD term);
          ``renormalised`` KL between both distributions renormalised over K;
          ``tail``         ``plain`` plus a bucket for everything outside K:
                           q_tail (log q_tail - log p_tail).
    Returns:
        [...] per-token loss.
    """
    if variant not in TOPK_KL_VARIANTS:
        raise ValueError(f"topk_kl variant {variant!r}; expected one of {TOPK_KL_VARIANTS}")
    logq = teacher_logprobs.detach()
    if variant == "renormalised":
        logq = logq - logq.logsumexp(-1, keepdim=True)
        student_logprobs = student_logprobs - student_logprobs.logsumexp(-1, keepdim=True)
    loss = (logq.exp() * (logq - student_logprobs)).sum(-1)
    if variant == "tail":
        q_tail = (-torch.expm1(logq.logsumexp(-1).clamp_max(0.0))).clamp_min(0.0)
        # Clamp before the log so neither branch of _log1mexp sees log(0) (NaN gradients).
        log_p_tail = _log1mexp(student_logprobs.logsumexp(-1).clamp_max(math.log1p(-TAIL_MASS_FLOOR)))
        loss = loss + torch.xlogy(q_tail, q_tail) - q_tail * log_p_tail
    return loss

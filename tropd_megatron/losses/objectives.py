"""Per-token objectives: pure functions of small per-token tensors (no vocabulary math).

Each takes its config and a ``TokenView`` of one micro-batch and returns
(per_token_loss [B, S], trust [B, S] in {0, 1}). ``trust`` is the share of on-policy tokens
whose reward is used as is (TrOPD: the trust mask; REOPOLD: its token mask; EOPD: tokens
without the extra top-k term; OPD and dense KL: all). Weighting, normalisation and the
teacher-prefix term are applied by ``distillation_loss``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .config import EOPDConfig, OPDConfig, REOPOLDConfig, TrOPDConfig
from .estimators import topk_forward_kl

# Caps log(ratio) before exp: a stale rollout with a huge ratio would overflow fp32.
MAX_LOG_IMPORTANCE_RATIO = 20.0


@dataclass
class TokenView:
    """One micro-batch, per token [B, S] (top-k fields [B, S, k]).

    logprob / topk_logprobs are the student's, differentiable; everything else is constant.
    log_ratio = log p_T(y) - log p_S(y). weight > 0 marks on-policy loss tokens; trust_keys
    are the stochastic trust mask's per-token hash keys (``sequence_token_keys``).
    """

    logprob: torch.Tensor
    topk_logprobs: torch.Tensor
    teacher_topk_logprobs: torch.Tensor
    log_ratio: torch.Tensor
    teacher_entropy: torch.Tensor
    student_entropy: torch.Tensor
    rollout_logprob: Optional[torch.Tensor]
    trust_keys: torch.Tensor
    weight: torch.Tensor


def policy_gradient(tokens: TokenView, reward: torch.Tensor, config: OPDConfig) -> torch.Tensor:
    """-A log p_S(y) with A = reward (constant); with rollout log-probs, rho = p_S(y) /
    p_rollout(y), either PPO's clipped -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
    (``importance="ppo"``) or the truncated importance weight -sg(min(rho, cap)) A log p_S(y)
    (``"tis"``): both the plain gradient when rho = 1."""
    reward = reward.detach()
    if tokens.rollout_logprob is None:
        return -reward * tokens.logprob
    log_rho = (tokens.logprob - tokens.rollout_logprob).clamp_max(MAX_LOG_IMPORTANCE_RATIO)
    rho = log_rho.exp()
    if config.importance == "tis":
        return -(rho.detach().clamp_max(config.tis_cap) * reward) * tokens.logprob
    return -torch.minimum(rho * reward, rho.clamp(1 - config.ppo_clip, 1 + config.ppo_clip) * reward)


def opd(config: OPDConfig, tokens: TokenView, step: int):
    return policy_gradient(tokens, tokens.log_ratio, config), torch.ones_like(tokens.log_ratio)


def eopd(config: EOPDConfig, tokens: TokenView, step: int):
    high_entropy = (tokens.teacher_entropy > config.entropy_threshold).float()
    fkl = topk_forward_kl(tokens.topk_logprobs, tokens.teacher_topk_logprobs, config.topk_kl)
    loss = policy_gradient(tokens, tokens.log_ratio, config) + config.alpha * high_entropy * fkl
    return loss, 1.0 - high_entropy


def reopold(config: REOPOLDConfig, tokens: TokenView, step: int):
    bound = config.bound
    if step < config.switch_step:
        mask = tokens.log_ratio >= bound
    else:
        in_loss = tokens.weight > 0
        if in_loss.any():
            cut = torch.quantile(tokens.student_entropy[in_loss].float(), config.entropy_quantile)
        else:
            cut = tokens.student_entropy.new_zeros(())
        mask = tokens.student_entropy >= cut
    mask = mask.float()
    reward = tokens.log_ratio.clamp_min(bound)
    return mask * policy_gradient(tokens, reward, config), mask


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer avalanche hash of 32-bit values held in int64 (products stay below 2**63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def sequence_token_keys(target_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token keys [B, S] (int64) for the stochastic trust mask: a hash of the token id,
    its position and a fingerprint of its sequence's loss tokens.

    A sequence gets the same keys whichever data-parallel rank, micro-batch or batch row
    holds it. Under context parallelism compute them on whole sequences before the split and
    pass them as ``distillation_loss(trust_keys=...)``.
    """
    positions = torch.arange(target_ids.shape[-1], device=target_ids.device)
    per_token = _mix32((target_ids.long() & _M32) ^ _mix32(positions + 0x9E3779B9))
    fingerprint = (per_token * (loss_mask != 0)).sum(-1, keepdim=True) & _M32
    return _mix32(per_token ^ _mix32(fingerprint))


def token_uniforms(seed: int, step: int, keys: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) draws, one per key: a pure function of (seed, step, key), identical on
    every tensor-parallel rank without communication."""
    salt = _mix32(torch.tensor(((seed & _M32) * 0x9E3779B1 + step) & _M32, device=keys.device))
    hashed = _mix32((keys & _M32) ^ salt)
    return (hashed >> 8).to(torch.float64).div(1 << 24).to(torch.float32)


RANDOM_MASK_SALT = 0x5BD1E995  # the random control's draws are not the stochastic mask's


def trust_mask(config: TrOPDConfig, tokens: TokenView, step: int) -> torch.Tensor:
    """M_t: Bernoulli(min(1, exp(r_t))) from seeded hashes, 1[r_t >= trust_threshold], or
    (the random control) Bernoulli of the micro-batch's mean min(1, exp(r_t))."""
    if config.trust == "deterministic":
        return (tokens.log_ratio >= config.trust_threshold).float()
    accept = tokens.log_ratio.clamp_max(0.0).exp()
    if config.trust == "random":
        on_policy = (tokens.weight > 0).float()
        rate = (accept * on_policy).sum() / on_policy.sum().clamp_min(1.0)
        return (token_uniforms(config.trust_seed, step, tokens.trust_keys ^ RANDOM_MASK_SALT) < rate).float()
    return (token_uniforms(config.trust_seed, step, tokens.trust_keys) < accept).float()


def tropd(config: TrOPDConfig, tokens: TokenView, step: int):
    mask = trust_mask(config, tokens, step)
    loss = mask * policy_gradient(tokens, tokens.log_ratio, config)
    if config.outlier == "clip":
        outlier = policy_gradient(tokens, tokens.log_ratio.clamp_min(config.outlier_clip), config)
        loss = loss + (1.0 - mask) * outlier
    elif config.outlier == "fkl":
        outlier = topk_forward_kl(tokens.topk_logprobs, tokens.teacher_topk_logprobs, config.topk_kl)
        loss = loss + (1.0 - mask) * outlier
    return loss, mask


def prefix_beta(config: TrOPDConfig, step: int, total_steps: int) -> float:
    """beta_s = beta_0 * (1 + cos(pi * s / S)) / 2: cosine-annealed from beta_0 to 0."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return config.prefix_beta * 0.5 * (1.0 + math.cos(math.pi * progress))


OBJECTIVES = {OPDConfig: opd, EOPDConfig: eopd, REOPOLDConfig: reopold, TrOPDConfig: tropd}

"""Plain single-process fp64 references over the full vocabulary, written from the
equations (docs/losses.md, "Objectives and their defaults"), independent of the library's sharded code paths.

Logits are [B, S, Vpad]; columns >= vocab are padding. The only library pieces used are
``sequence_token_keys`` and ``token_uniforms``, the seeded hash that the stochastic trust mask draws from (tested on
its own in test_trust_mask.py), so that reference and library draw the same Bernoullis.
"""
from __future__ import annotations

import math

import torch

from tropd_megatron.losses import (DenseKLConfig, EOPDConfig, OPDConfig, REOPOLDConfig, TrOPDConfig, sequence_token_keys,
                                   token_uniforms)


def log_probs(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.log_softmax(logits[..., :vocab].double(), dim=-1)


def entropy(logits, vocab):
    lp = log_probs(logits, vocab)
    return -(lp.exp() * lp).sum(-1)


def forward_kl(student, teacher, vocab):
    lp, lq = log_probs(student, vocab), log_probs(teacher, vocab)
    return (lq.exp() * (lq - lp)).sum(-1)


def reverse_kl(student, teacher, vocab):
    lp, lq = log_probs(student, vocab), log_probs(teacher, vocab)
    return (lp.exp() * (lp - lq)).sum(-1)


def topk_fkl(lp_top, lq_top, variant):
    q, p = lq_top.exp(), lp_top.exp()
    if variant == "plain":
        return (q * (lq_top - lp_top)).sum(-1)
    if variant == "renormalised":
        qn, pn = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)
        return (qn * (qn.log() - pn.log())).sum(-1)
    q_tail, p_tail = 1 - q.sum(-1), 1 - p.sum(-1)
    return (q * (lq_top - lp_top)).sum(-1) + q_tail * (q_tail.log() - p_tail.log())


def pg(lp_y, reward, rollout, config):
    if rollout is None:
        return -reward * lp_y
    ratio = torch.exp(lp_y - rollout)
    if config.importance == "tis":  # truncated importance weight, no gradient through it
        return -ratio.detach().clamp_max(config.tis_cap) * reward * lp_y
    eps = config.ppo_clip
    return -torch.minimum(ratio * reward, ratio.clamp(1 - eps, 1 + eps) * reward)


def objective(config, student, teacher, y, mask, *, vocab, prefix=None, rollout=None, step=0, total_steps=1,
              keys_mask=None):
    """Returns (loss_sum, num_tokens) with autograd to ``student`` (fp64). ``keys_mask`` is the
    rollout's loss mask that the trust-mask keys hash (default ``mask``)."""
    lp, lq = log_probs(student, vocab), log_probs(teacher, vocab)
    lp_y = lp.gather(-1, y[..., None])[..., 0]
    lq_y = lq.gather(-1, y[..., None])[..., 0]
    r = (lq_y - lp_y).detach()
    w = mask.double()
    pre = torch.zeros_like(w) if prefix is None else prefix.double() * w
    pol = w - pre
    ro = None if rollout is None else rollout.double()

    def topk_term(k, variant):
        lq_top, ids = lq.topk(k, dim=-1)
        return topk_fkl(lp.gather(-1, ids), lq_top, variant)

    if isinstance(config, DenseKLConfig):
        per = forward_kl(student, teacher, vocab) if config.direction == "forward" else reverse_kl(student, teacher, vocab)
    elif isinstance(config, EOPDConfig):
        gate = (entropy(teacher, vocab) > config.entropy_threshold).double()
        per = pg(lp_y, r, ro, config) + config.alpha * gate * topk_term(config.topk, config.topk_kl)
    elif isinstance(config, REOPOLDConfig):
        b = (math.log(config.lam / (1 - config.lam)) if config.reward_floor == "log_odds"
             else math.log(config.lam) / (1 - config.lam))
        if step < config.switch_step:
            m = (r >= b).double()
        else:
            hs = entropy(student, vocab).detach()
            m = (hs >= torch.quantile(hs[pol > 0], config.entropy_quantile)).double()
        per = m * pg(lp_y, r.clamp_min(b), ro, config)
    elif isinstance(config, TrOPDConfig):
        if config.trust == "deterministic":
            m = (r >= config.trust_threshold).double()
        else:
            u = token_uniforms(config.trust_seed, step, sequence_token_keys(y, mask if keys_mask is None else keys_mask)).double()
            m = (u < torch.clamp(torch.exp(r), max=1.0)).double()
        per = m * pg(lp_y, r, ro, config)
        if config.outlier == "clip":
            per = per + (1 - m) * pg(lp_y, r.clamp_min(config.outlier_clip), ro, config)
        elif config.outlier == "fkl":
            per = per + (1 - m) * topk_term(config.topk, config.topk_kl)
    elif isinstance(config, OPDConfig):
        per = pg(lp_y, r, ro, config)
    else:
        raise TypeError(config)
    loss = (per * pol).sum()
    if prefix is not None:
        beta = config.prefix_beta * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        loss = loss - beta * (lp_y * pre).sum()
    return loss, w.sum()

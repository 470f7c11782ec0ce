"""``distillation_loss``: the one entry point a Megatron ``loss_func`` calls."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from .collectives import ProcessGroup, VocabShard
from .config import ObjectiveConfig
from .estimators import kl_estimators
from .objectives import OBJECTIVES, TokenView, prefix_beta, sequence_token_keys
from .teacher import TeacherSignal
from .vocab import dense_forward_kl, dense_reverse_kl, gather_logprobs

# Metrics that are token counts; "loss" is a sum over all loss tokens (mean: / tokens); every
# other metric is a sum over on-policy tokens (mean: / policy_tokens).
COUNT_METRICS = ("tokens", "policy_tokens", "prefix_tokens", "nonfinite_tokens")
# rollout_log_ratio_p99 on a grid of quarter decades, 1e-6 to 1e2: the loss sums, per edge, the
# tokens whose |log rho| exceeds it (O(1) scalars, reduced with the rest); reduce_metrics
# reports the smallest edge that at most 1% of the tokens exceed (the p99, rounded up to the
# grid; 1e2 when even that is exceeded)
LOG_RATIO_EDGES = tuple(10 ** (k / 4) for k in range(-24, 9))
_ABOVE = "rollout_log_ratio_above/"  # + the edge's index: the per-edge sums, dropped by reduce_metrics


def _expect(name: str, tensor, shape, *, floating: bool = False, integer: bool = False) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}")
    if floating and not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if integer and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {tensor.dtype}")


def _teacher_signal(teacher, target_ids, config, tp_group, vocab_size, local_vocab):
    """Returns (TeacherSignal, dense teacher logits or None)."""
    B, S = target_ids.shape
    if isinstance(teacher, torch.Tensor):
        _expect("teacher (logits shard)", teacher, (B, S, local_vocab), floating=True)
        logits = teacher.detach()
        signal = TeacherSignal.from_logits(
            logits, target_ids, topk=config.signal_topk, tp_group=tp_group, vocab_size=vocab_size
        )
        return signal, logits
    if not isinstance(teacher, TeacherSignal):
        raise TypeError(f"teacher must be a TeacherSignal or the teacher's logits shard, got {type(teacher).__name__}")
    if config.teacher_input == "logits":
        raise ValueError(f"{type(config).__name__} needs the teacher's logits shard (dense mode), not a TeacherSignal")
    _expect("teacher.token_logprobs", teacher.token_logprobs, (B, S), floating=True)
    _expect("teacher.valid", teacher.valid, (B, S))
    if teacher.topk < config.signal_topk:
        raise ValueError(
            f"teacher signal holds top-{teacher.topk}; {type(config).__name__} needs top-{config.signal_topk}"
        )
    return teacher, None


def _loss_token_ids(target_ids, in_loss, local_vocab, tp_group, vocab_size) -> torch.Tensor:
    """int64 ids, 0 outside the vocabulary; an out-of-range id at a loss token is an error."""
    true_vocab = VocabShard.of(local_vocab, tp_group, vocab_size).vocab_size
    in_range = (target_ids >= 0) & (target_ids < true_vocab)
    if bool((in_loss & ~in_range).any()):
        bad = target_ids[in_loss & ~in_range][0].item()
        raise ValueError(f"target_ids holds id {bad} at a loss token; ids must be in [0, {true_vocab})")
    return torch.where(in_range, target_ids.long(), 0)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher: Union[TeacherSignal, torch.Tensor],
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    config: ObjectiveConfig,
    *,
    prefix_mask: Optional[torch.Tensor] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    tp_group: ProcessGroup = None,
    vocab_size: Optional[int] = None,
    step: int = 0,
    total_steps: int = 1,
    inplace_backward: bool = False,
    trust_keys: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss of one micro-batch on tensor-parallel vocab-sharded logits.

    Args:
        student_logits: [B, S, V/TP] the student's local vocabulary shard, any float dtype
            (arithmetic in fp32). Gradients flow to it.
        teacher: a ``TeacherSignal`` (compact mode) or the teacher's logits shard
            [B, S, V/TP] (dense mode; needed by ``DenseKLConfig``).
        target_ids: [B, S] global ids of the sampled tokens, aligned with the logits
            (position s holds the token the logits at s predict). Ignored where loss_mask is 0.
        loss_mask: [B, S] token weights (1 for response tokens, 0 elsewhere).
        config: OPDConfig, EOPDConfig, REOPOLDConfig, TrOPDConfig or DenseKLConfig.
        prefix_mask: [B, S] bool, teacher-written prefix tokens (TrOPD prefix guidance):
            they get beta_s * (-log p_S(y)) instead of the on-policy objective.
        rollout_logprobs: [B, S] student log-probs at rollout time: turns reward terms into
            PPO-clipped importance-ratio terms (stale rollouts).
        tp_group: tensor-parallel group the vocabulary is split over (None: unsharded).
        vocab_size: the tokenizer's true vocabulary size; ids >= it are padding (-inf).
        step, total_steps: training progress (REOPOLD switch, TrOPD mask seed and beta_s).
        inplace_backward: the backward writes the gradient into student_logits' storage
            instead of a new buffer (one shard less at peak; read the logits before backward).
            Not with DenseKLConfig, whose full-vocabulary terms read the logits in backward.
        trust_keys: [B, S] int64 keys of the stochastic trust mask's draws; default
            ``sequence_token_keys(target_ids, loss_mask)``. With context parallelism compute
            them on whole sequences before splitting them.
    Returns:
        loss_sum: differentiable scalar, the sum of per-token losses. Divide by the global
            token count (num_tokens summed over DP x CP x micro-batches) for the gradient to
            be independent of how the batch was split.
        num_tokens: int32 scalar, the loss tokens (nonzero weight, teacher-faulty ones
            excluded): what Megatron's schedules sum with calculate_per_token_loss=True.
        metrics: token sums (detached fp32 scalars): "loss" and the metrics listed in the
            README; ``reduce_metrics`` turns them into means.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits has shape {tuple(student_logits.shape)}; expected [B, S, V/TP]")
    _expect("student_logits", student_logits, student_logits.shape, floating=True)
    B, S, local_vocab = student_logits.shape
    _expect("target_ids", target_ids, (B, S), integer=True)
    _expect("loss_mask", loss_mask, (B, S))
    if prefix_mask is not None:
        _expect("prefix_mask", prefix_mask, (B, S))
        if not config.uses_prefix_mask:
            raise ValueError(f"prefix_mask is used by TrOPDConfig's prefix guidance only, not {type(config).__name__}")
    if trust_keys is not None:
        _expect("trust_keys", trust_keys, (B, S), integer=True)
    if rollout_logprobs is not None:
        _expect("rollout_logprobs", rollout_logprobs, (B, S), floating=True)
        if not config.uses_rollout_logprobs:
            raise ValueError(f"rollout_logprobs does not apply to {type(config).__name__} (no reward term)")
    if inplace_backward and config.teacher_input == "logits":
        raise ValueError(f"inplace_backward is not supported with {type(config).__name__} (its backward reads the "
                         "logits)")
    signal, dense_logits = _teacher_signal(teacher, target_ids, config, tp_group, vocab_size, local_vocab)

    weight = loss_mask.detach().float()
    in_loss = weight != 0
    nonfinite = in_loss & ~signal.valid
    weight = torch.where(signal.valid, weight, 0.0)
    prefix = torch.zeros_like(in_loss) if prefix_mask is None else prefix_mask.bool()
    policy_weight = torch.where(prefix, 0.0, weight)
    prefix_weight = torch.where(prefix, weight, 0.0)

    ids = _loss_token_ids(target_ids, in_loss, local_vocab, tp_group, vocab_size)
    k = config.signal_topk
    all_ids = torch.cat([ids[..., None], signal.topk_ids[..., :k].long()], dim=-1)
    logprobs, student_entropy = gather_logprobs(
        student_logits, all_ids, tp_group=tp_group, vocab_size=vocab_size, inplace_backward=inplace_backward
    )
    logprob = logprobs[..., 0]
    log_ratio = (signal.token_logprobs - logprob).detach()

    if config.teacher_input == "logits":  # DenseKLConfig: full-vocabulary terms on the teacher's logits
        teacher_logits = torch.where(signal.valid[..., None], dense_logits, 0.0)
        kl = dense_forward_kl if config.direction == "forward" else dense_reverse_kl
        per_token = kl(student_logits, teacher_logits, tp_group=tp_group, vocab_size=vocab_size)
        trust = torch.ones_like(log_ratio)
    else:
        tokens = TokenView(
            logprob=logprob,
            topk_logprobs=logprobs[..., 1:],
            teacher_topk_logprobs=signal.topk_logprobs[..., :k],
            log_ratio=log_ratio,
            teacher_entropy=signal.entropy,
            student_entropy=student_entropy,
            rollout_logprob=None if rollout_logprobs is None else rollout_logprobs.detach().float(),
            trust_keys=sequence_token_keys(ids, loss_mask) if trust_keys is None else trust_keys,
            weight=policy_weight,
        )
        per_token, trust = OBJECTIVES[type(config)](config, tokens, step)
    loss_sum = (per_token * policy_weight).sum()
    if prefix_mask is not None:
        loss_sum = loss_sum - prefix_beta(config, step, total_steps) * (logprob * prefix_weight).sum()

    k1, _, k3 = kl_estimators(log_ratio)

    def token_sum(x):
        return (x.detach().float() * policy_weight).sum()

    metrics = {
        "loss": loss_sum.detach().float(),
        "tokens": weight.sum(),
        "policy_tokens": policy_weight.sum(),
        "prefix_tokens": prefix_weight.sum(),
        "nonfinite_tokens": nonfinite.sum().float(),
        "trust_fraction": token_sum(trust),
        "outlier_fraction": token_sum(1.0 - trust),
        "log_ratio": token_sum(log_ratio),
        "kl_k1": token_sum(k1),
        "kl_k3": token_sum(k3),
        "teacher_entropy": token_sum(signal.entropy),
        "student_entropy": token_sum(student_entropy),
    }
    if rollout_logprobs is not None:
        # the train / rollout mismatch: |log rho| and the share of tokens the importance
        # correction clips (PPO: rho outside [1 - eps, 1 + eps]; TIS: rho above the cap); 0
        # where the engine's log-probs are the training forward's, as on CPU
        log_rho = logprob.detach().float() - rollout_logprobs.detach().float()
        clipped = (log_rho.exp() > config.tis_cap if config.importance == "tis"
                   else (log_rho.exp() - 1).abs() > config.ppo_clip)
        metrics["rollout_log_ratio_abs"] = token_sum(log_rho.abs())
        metrics["rollout_clip_fraction"] = token_sum(clipped)
        edges = torch.tensor(LOG_RATIO_EDGES, dtype=torch.float32, device=log_rho.device)
        above = ((log_rho.abs()[..., None] > edges) * policy_weight[..., None]).flatten(0, -2).sum(0)
        metrics.update({f"{_ABOVE}{i:02d}": v for i, v in enumerate(above)})
    return loss_sum, (weight != 0).sum().to(torch.int32), metrics


def supervised_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    tp_group: ProcessGroup = None,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cross entropy on a vocab shard, in ``distillation_loss``'s return convention.

    logits [B, S, V/TP]; target_ids, loss_mask [B, S]. Returns (sum of -log p(y) weighted by
    loss_mask, int32 token count, {"loss", "tokens", "policy_tokens"} token sums)."""
    B, S = target_ids.shape
    _expect("logits", logits, (B, S, logits.shape[-1]), floating=True)
    _expect("loss_mask", loss_mask, (B, S))
    weight = loss_mask.detach().float()
    ids = _loss_token_ids(target_ids, weight != 0, logits.shape[-1], tp_group, vocab_size)
    logprob, _ = gather_logprobs(logits, ids[..., None], tp_group=tp_group, vocab_size=vocab_size)
    loss_sum = -(logprob[..., 0] * weight).sum()
    tokens = weight.sum()
    return loss_sum, (weight != 0).sum().to(torch.int32), {"loss": loss_sum.detach(), "tokens": tokens,
                                                          "policy_tokens": tokens}


def reduce_metrics(metrics: dict[str, torch.Tensor], group: ProcessGroup = None) -> dict[str, float]:
    """Sum token-summed metrics over ``group`` (data-parallel ranks, micro-batches already
    added up) and turn sums into per-on-policy-token means; counts stay counts."""
    keys = sorted(metrics)
    values = torch.stack([metrics[key].detach().double() for key in keys])
    if group is not None:
        dist.all_reduce(values, group=group)
    totals = dict(zip(keys, values.tolist()))

    def mean(key, value):
        return value / max(totals.get("tokens" if key == "loss" else "policy_tokens", 0.0), 1e-12)

    reduced = {key: value if key in COUNT_METRICS else mean(key, value) for key, value in totals.items()
               if not key.startswith(_ABOVE)}
    above = [mean(key, value) for key, value in totals.items() if key.startswith(_ABOVE)]  # sorted by index
    if above:
        reduced["rollout_log_ratio_p99"] = next((e for e, f in zip(LOG_RATIO_EDGES, above) if f <= 0.01),
                                                LOG_RATIO_EDGES[-1])
    return reduced

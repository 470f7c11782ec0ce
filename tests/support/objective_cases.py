"""The objective cases the loss tests share: each objective's configuration, the sharded run
of ``distillation_loss`` on one rank, and the fp64 full-vocabulary reference."""
import torch

from support import reference as ref
from support.distributed import shard
from tropd_megatron.losses import (DenseKLConfig, EOPDConfig, OPDConfig, REOPOLDConfig, TeacherSignal, TrOPDConfig,
                                   distillation_loss)

RTOL, ATOL = 1e-5, 1e-5  # fp32 shard arithmetic against fp64

# (name, config, uses prefix_mask, uses rollout_logprobs, step)
CASES = [
    ("opd", OPDConfig(), False, False, 0),
    ("opd_stale", OPDConfig(ppo_clip=0.2), False, True, 0),
    ("opd_stale_tis", OPDConfig(importance="tis", tis_cap=1.5), False, True, 0),
    ("eopd", EOPDConfig(entropy_threshold=2.0, topk=8), False, False, 0),
    ("eopd_renorm", EOPDConfig(entropy_threshold=2.0, topk=8, topk_kl="renormalised", alpha=0.5), False, False, 0),
    ("eopd_tail", EOPDConfig(entropy_threshold=0.0, topk=8, topk_kl="tail"), False, False, 0),
    ("reopold_explore", REOPOLDConfig(switch_step=10), False, False, 3),
    ("reopold_entropy", REOPOLDConfig(switch_step=10, reward_floor="log_over_one_minus"), False, False, 10),
    ("tropd_stoch_fkl", TrOPDConfig(topk=16, seed=7), False, False, 5),
    ("tropd_det_clip", TrOPDConfig(trust="deterministic", outlier="clip", outlier_clip=-0.5), False, False, 0),
    ("tropd_det_mask", TrOPDConfig(trust="deterministic", trust_threshold=-0.7, outlier="mask"), False, False, 0),
    ("tropd_tail_stale", TrOPDConfig(topk=16, topk_kl="tail"), False, True, 2),
    ("tropd_tis", TrOPDConfig(topk=16, importance="tis", tis_cap=1.5), False, True, 2),
    ("tropd_prefix", TrOPDConfig(topk=16, prefix_beta=0.3), True, False, 30),
    ("dense_fkl", DenseKLConfig("forward"), False, False, 0),
    ("dense_rkl", DenseKLConfig("reverse"), False, False, 0),
]
TOTAL_STEPS = 100


def run_case(batch, case, mode, rank, world, group, dtype=torch.float32):
    """distillation_loss on this rank's shard: (loss, num_tokens, metrics, local grad)."""
    _, config, use_prefix, use_rollout, step = case
    x = shard(batch["student"], rank, world).to(dtype).requires_grad_(True)
    teacher = shard(batch["teacher"], rank, world).float()
    if mode == "compact":
        teacher = TeacherSignal.from_logits(
            teacher, batch["target"], topk=config.signal_topk, tp_group=group, vocab_size=batch["vocab"]
        )
    loss, n, metrics = distillation_loss(
        x, teacher, batch["target"], batch["mask"], config,
        prefix_mask=batch["prefix"] if use_prefix else None,
        rollout_logprobs=batch["rollout"].float() if use_rollout else None,
        tp_group=group, vocab_size=batch["vocab"], step=step, total_steps=TOTAL_STEPS,
    )
    loss.backward()
    return loss.detach(), n, {k: v for k, v in metrics.items()}, x.grad


def modes(case):
    return ["dense"] if isinstance(case[1], DenseKLConfig) else ["compact", "dense"]


def reference_case(batch, case):
    _, config, use_prefix, use_rollout, step = case
    x = batch["student"].clone().requires_grad_(True)
    target = batch["target"].clamp_min(0)
    loss, n = ref.objective(
        config, x, batch["teacher"], target, batch["mask"], vocab=batch["vocab"],
        prefix=batch["prefix"] if use_prefix else None,
        rollout=batch["rollout"].float().double() if use_rollout else None,
        step=step, total_steps=TOTAL_STEPS, keys_mask=batch.get("keys_mask"),
    )
    loss.backward()
    return loss.item(), n.item(), x.grad.numpy()

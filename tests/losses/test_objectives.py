"""distillation_loss for every objective at TP = 1, 2, 4 (compact and dense teacher modes)
against the fp64 full-vocabulary reference: loss, gradient w.r.t. the student logits, and
metrics; then data-parallel invariance and bf16 inputs."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from support import reference as ref
from support.batches import make_batch
from support.distributed import run_workers, shard, unshard
from support.objective_cases import ATOL, CASES, RTOL, TOTAL_STEPS, modes, reference_case, run_case
from tropd_megatron.losses import (
    TrOPDConfig,
    distillation_loss,
    kl_estimators,
    reduce_metrics,
    sequence_token_keys,
    supervised_loss,
)

def _all_cases_worker(rank, world, batch):
    return [run_case(batch, case, mode, rank, world, dist.group.WORLD) for case in CASES for mode in modes(case)]


def reference_metrics(batch, use_prefix, config=None, use_rollout=False):
    vocab = batch["vocab"]
    target = batch["target"].clamp_min(0)
    lp = ref.log_probs(batch["student"], vocab).gather(-1, target[..., None])[..., 0]
    lq = ref.log_probs(batch["teacher"], vocab).gather(-1, target[..., None])[..., 0]
    w = batch["mask"] * (~batch["prefix"] if use_prefix else 1.0)
    r = lq - lp
    k1, _, k3 = kl_estimators(r)
    mean = lambda v: ((v * w).sum() / w.sum()).item()  # noqa: E731
    out = {
        "log_ratio": mean(r), "kl_k1": mean(k1), "kl_k3": mean(k3),
        "teacher_entropy": mean(ref.entropy(batch["teacher"], vocab)),
        "student_entropy": mean(ref.entropy(batch["student"], vocab)),
        "policy_tokens": w.sum().item(),
    }
    if use_rollout:  # the train / rollout mismatch: mean |log rho| and PPO's clipped share
        log_rho = lp - batch["rollout"].double()
        out["rollout_log_ratio_abs"] = mean(log_rho.abs())
        rho = log_rho.exp()
        clipped = rho > config.tis_cap if config.importance == "tis" else (rho - 1).abs() > config.ppo_clip
        out["rollout_clip_fraction"] = mean(clipped.double())
        # the smallest quarter-decade edge that at most 1% of the tokens' |log rho| exceed
        above = [mean((log_rho.abs() > 10 ** (k / 4)).double()) for k in range(-24, 9)]
        out["rollout_log_ratio_p99"] = next(10 ** (k / 4) for k, f in zip(range(-24, 9), above) if f <= 0.01)
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_objectives_match_reference(tp):
    batch = make_batch()
    if tp == 1:
        ranks = [[run_case(batch, case, mode, 0, 1, None) for case in CASES for mode in modes(case)]]
        ranks = [[tuple(v.numpy() if isinstance(v, torch.Tensor) else
                        ({k: m.numpy() for k, m in v.items()} if isinstance(v, dict) else v) for v in res)
                  for res in ranks[0]]]
    else:
        ranks = run_workers(_all_cases_worker, tp, batch)
    results = iter(range(len(ranks[0])))
    for case in CASES:
        name, config, use_prefix, use_rollout, _ = case
        exp_loss, exp_n, exp_grad = reference_case(batch, case)
        exp_metrics = reference_metrics(batch, use_prefix, config, use_rollout)
        if use_rollout:  # the test's rollout log-probs are off-policy: some tokens are clipped, not all
            assert 0 < exp_metrics["rollout_clip_fraction"] < 1 and exp_metrics["rollout_log_ratio_abs"] > 0
        for mode in modes(case):
            i = next(results)
            what = f"{name} [{mode}, TP={tp}]"
            losses = [float(r[i][0]) for r in ranks]
            assert len(set(losses)) == 1, f"{what}: loss differs across TP ranks {losses}"
            np.testing.assert_allclose(losses[0], exp_loss, rtol=RTOL, atol=ATOL, err_msg=what)
            assert float(ranks[0][i][1]) == exp_n and ranks[0][i][1].dtype == np.int32  # Megatron sums ints
            grad = unshard([r[i][3] for r in ranks])
            np.testing.assert_allclose(grad, exp_grad, rtol=RTOL, atol=ATOL, err_msg=what + " grad")
            assert np.abs(grad).sum() > 0, what
            metrics = reduce_metrics({k: torch.as_tensor(v) for k, v in ranks[0][i][2].items()})
            for key, value in exp_metrics.items():
                np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-5, err_msg=f"{what} {key}")
            assert math.isclose(metrics["trust_fraction"] + metrics["outlier_fraction"], 1.0, rel_tol=1e-6)
            np.testing.assert_allclose(metrics["loss"], exp_loss / exp_n, rtol=1e-5, atol=1e-6, err_msg=what)


# Data-parallel invariance: the batch split over DP ranks with global token normalisation
# gives the same gradient as one rank holding it all. DP x TP = 2 x 2 over 4 processes.
DP_CASES = [c for c in CASES if c[0] in ("opd", "eopd", "reopold_explore", "tropd_stoch_fkl", "tropd_prefix", "dense_rkl")]


def _dp_worker(rank, world, batch, tp):
    dp = world // tp
    tp_groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(dp)]
    dp_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    dp_rank, tp_rank = rank // tp, rank % tp
    rows = batch["student"].shape[0] // dp
    part = {k: (v[dp_rank * rows : (dp_rank + 1) * rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    out = []
    for case in DP_CASES:
        _, config, use_prefix, _, step = case
        x = shard(part["student"], tp_rank, tp).float().requires_grad_(True)
        loss_sum, n, _ = distillation_loss(
            x, shard(part["teacher"], tp_rank, tp).float(), part["target"], part["mask"], config,
            prefix_mask=part["prefix"] if use_prefix else None, tp_group=tp_groups[dp_rank],
            vocab_size=part["vocab"], step=step, total_steps=TOTAL_STEPS,
        )
        total = n.clone()
        dist.all_reduce(total, group=dp_groups[tp_rank])
        (loss_sum / total).backward()
        out.append(x.grad)
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_data_parallel_split_gives_the_same_gradient(tp):
    batch = make_batch(seed=3, B=4)
    ranks = run_workers(_dp_worker, 2 * tp, batch, tp)
    for i, case in enumerate(DP_CASES):
        _, n, grad = reference_case(batch, case)
        rows = [unshard([ranks[d * tp + t][i] for t in range(tp)]) for d in range(2)]
        np.testing.assert_allclose(np.concatenate(rows, 0), grad / n, rtol=RTOL, atol=1e-6, err_msg=case[0])


def _cp_worker(rank, world, batch):
    """Context parallelism: each rank holds half of every sequence (positions split), the
    trust-mask keys computed on whole sequences before the split."""
    keys = sequence_token_keys(batch["target"].clamp_min(0), batch["mask"])
    half = batch["student"].shape[1] // world
    cut = slice(rank * half, (rank + 1) * half)
    out = []
    for case in DP_CASES:
        _, config, use_prefix, _, step = case
        x = batch["student"][:, cut].float().requires_grad_(True)
        loss_sum, n, _ = distillation_loss(
            x, batch["teacher"][:, cut].float(), batch["target"][:, cut], batch["mask"][:, cut], config,
            prefix_mask=batch["prefix"][:, cut] if use_prefix else None, vocab_size=batch["vocab"],
            step=step, total_steps=TOTAL_STEPS, trust_keys=keys[:, cut],
        )
        total = n.clone()
        dist.all_reduce(total)
        (loss_sum / total).backward()
        out.append(x.grad)
    return out


def test_context_parallel_split_gives_the_same_gradient():
    batch = make_batch(seed=4, B=2, S=8)
    ranks = run_workers(_cp_worker, 2, batch)
    for i, case in enumerate(DP_CASES):
        _, n, grad = reference_case(batch, case)
        np.testing.assert_allclose(np.concatenate([r[i] for r in ranks], 1), grad / n, rtol=RTOL, atol=1e-6,
                                   err_msg=case[0])


@pytest.mark.parametrize("name", ["opd", "eopd", "tropd_stoch_fkl", "tropd_det_clip", "dense_fkl"])
def test_bf16_student_logits_accumulate_in_fp32(name):
    """bf16 logits against the reference on the same bf16-rounded values: only accumulation
    error remains, so the loss must agree to fp32 accuracy (rtol 1e-5); the gradient comes
    back in bf16, so it is compared at bf16 resolution (rtol 1e-2, atol 1e-4)."""
    case = next(c for c in CASES if c[0] == name)
    batch = make_batch(seed=5)
    batch["student"] = batch["student"].to(torch.bfloat16).double()
    loss, _, _, grad = run_case(batch, case, "dense", 0, 1, None, dtype=torch.bfloat16)
    assert grad.dtype == torch.bfloat16
    exp_loss, _, exp_grad = reference_case(batch, case)
    np.testing.assert_allclose(loss.item(), exp_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad.double().numpy(), exp_grad, rtol=1e-2, atol=1e-4)


def _inplace_worker(rank, world, batch, dtype):
    group = dist.group.WORLD if world > 1 else None
    out = []
    for inplace in (False, True):
        x = shard(batch["student"], rank, world).to(dtype).requires_grad_(True)
        logits = x * 1  # a non-leaf, like a model's output
        logits.retain_grad()
        loss, _, _ = distillation_loss(logits, shard(batch["teacher"], rank, world).float(), batch["target"],
                                       batch["mask"], TrOPDConfig(topk=16), tp_group=group, vocab_size=batch["vocab"],
                                       inplace_backward=inplace)
        loss.backward()
        out.append((x.grad, logits.detach().clone()))
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward_gives_the_same_gradient(tp, dtype):
    batch = make_batch(seed=8)
    ranks = [_inplace_worker(0, 1, batch, dtype)] if tp == 1 else run_workers(_inplace_worker, tp, batch, dtype)
    for r in ranks:
        (grad, logits), (grad_inplace, consumed) = r
        assert torch.equal(torch.as_tensor(grad), torch.as_tensor(grad_inplace))
        assert torch.equal(torch.as_tensor(consumed), torch.as_tensor(grad_inplace))  # logits now hold the gradient
        assert not torch.equal(torch.as_tensor(logits), torch.as_tensor(consumed))


def _supervised_worker(rank, world, batch):
    group = dist.group.WORLD if world > 1 else None
    x = shard(batch["student"], rank, world).float().requires_grad_(True)
    loss, n, metrics = supervised_loss(x, batch["target"], batch["mask"], tp_group=group, vocab_size=batch["vocab"])
    loss.backward()
    return loss.detach(), n, x.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_supervised_loss_matches_reference(tp):
    batch = make_batch(seed=12)
    ranks = [_supervised_worker(0, 1, batch)] if tp == 1 else run_workers(_supervised_worker, tp, batch)
    x = batch["student"].clone().requires_grad_(True)
    lp = ref.log_probs(x, batch["vocab"]).gather(-1, batch["target"].clamp_min(0)[..., None])[..., 0]
    expected = -(lp * batch["mask"]).sum()
    expected.backward()
    np.testing.assert_allclose(float(ranks[0][0]), expected.item(), rtol=RTOL, atol=ATOL)
    assert int(ranks[0][1]) == int(batch["mask"].sum())
    grad = unshard([np.asarray(r[2]) for r in ranks])
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=RTOL, atol=ATOL)

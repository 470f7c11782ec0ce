"""Bad numbers and bad input: non-finite teacher logits, padded vocabulary, all-masked
batches, and errors that name the offending argument."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from support.batches import make_batch
from support.distributed import run_workers, unshard
from support.objective_cases import CASES, RTOL, ATOL, modes, reference_case, run_case
from tropd_megatron.losses import (
    DenseKLConfig,
    EOPDConfig,
    OPDConfig,
    REOPOLDConfig,
    TeacherSignal,
    TrOPDConfig,
    distillation_loss,
    reduce_metrics,
)

# Teacher faults at loss tokens (b, s, column): NaN, +inf and -inf. Column 0 lies on rank 0
# and column 40 on the last rank at TP = 2, so the fault flag must cross ranks.
FAULTS = [(0, 3, 40, float("nan")), (1, 4, 0, float("inf")), (1, 6, 7, float("-inf"))]
FAULT_CASES = [c for c in CASES if c[0] in ("opd", "eopd", "reopold_explore", "tropd_stoch_fkl", "tropd_prefix", "dense_rkl")]


def faulty_batch():
    batch = make_batch(seed=11)
    # keys_mask: the trust-mask draws hash the rollout's mask, whatever the teacher did
    clean = dict(batch, mask=batch["mask"].clone(), teacher=batch["teacher"].clone(), keys_mask=batch["mask"])
    for b, s, col, value in FAULTS:
        batch["teacher"][b, s, col] = value
        clean["mask"][b, s] = 0.0  # the reference simply drops the faulty tokens
    return batch, clean


def _fault_worker(rank, world, batch):
    return [run_case(batch, case, mode, rank, world, dist.group.WORLD) for case in FAULT_CASES for mode in modes(case)]


@pytest.mark.parametrize("tp", [1, 2])
def test_nonfinite_teacher_logits_mask_their_tokens(tp):
    batch, clean = faulty_batch()
    if tp == 1:
        ranks = [[tuple(v if not isinstance(v, torch.Tensor) else v.numpy() for v in run_case(batch, c, m, 0, 1, None))
                  for c in FAULT_CASES for m in modes(c)]]
    else:
        ranks = run_workers(_fault_worker, tp, batch)
    i = 0
    for case in FAULT_CASES:
        exp_loss, exp_n, exp_grad = reference_case(clean, case)
        for mode in modes(case):
            what = f"{case[0]} [{mode}, TP={tp}]"
            loss, n, metrics, _ = ranks[0][i]
            grad = unshard([r[i][3] for r in ranks])
            assert np.isfinite(grad).all(), what
            np.testing.assert_allclose(float(loss), exp_loss, rtol=RTOL, atol=ATOL, err_msg=what)
            np.testing.assert_allclose(grad, exp_grad, rtol=RTOL, atol=ATOL, err_msg=what)
            assert float(n) == exp_n, what
            assert float(metrics["nonfinite_tokens"]) == len(FAULTS), what
            assert all(np.isfinite(float(v)) for v in metrics.values()), what
            for b, s, _, _ in FAULTS:
                assert not grad[b, s].any(), f"{what}: faulty token ({b}, {s}) got a gradient"
            i += 1


def test_teacher_signal_marks_and_zeroes_faulty_tokens():
    batch, _ = faulty_batch()
    sig = TeacherSignal.from_logits(batch["teacher"].float(), batch["target"], topk=4, vocab_size=batch["vocab"])
    expected = torch.ones_like(sig.valid)
    for b, s, _, _ in FAULTS:
        expected[b, s] = False
    assert torch.equal(sig.valid, expected)  # NaN in padded columns is not a fault
    for field in (sig.token_logprobs, sig.entropy, sig.topk_logprobs):
        assert torch.isfinite(field).all()
        assert not field[~sig.valid].any()
    assert sig.nbytes() == sig.valid.numel() * (2 * 4 + 1 + 4 * 8)  # two fp32, a bool, k x (int32 + fp32)


ALL_CONFIGS = [c[1] for c in CASES]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=[c[0] for c in CASES])
def test_all_masked_batch_gives_zero_loss_and_zero_gradient(config):
    batch = make_batch(seed=2)
    x = batch["student"].float().requires_grad_(True)
    loss, n, metrics = distillation_loss(
        x, batch["teacher"].float(), batch["target"], torch.zeros_like(batch["mask"]), config,
        prefix_mask=batch["prefix"] if isinstance(config, TrOPDConfig) else None,
        vocab_size=batch["vocab"], step=50, total_steps=100,
    )
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    reduced = reduce_metrics(metrics)
    assert all(np.isfinite(v) for v in reduced.values()), reduced


def test_padded_vocabulary_columns_never_matter():
    batch = make_batch(seed=4)
    grads = []
    for garbage in (0.0, 1e4):
        student = batch["student"].clone()
        student[..., batch["vocab"]:] = garbage
        x = student.float().requires_grad_(True)
        teacher = batch["teacher"].clone()
        teacher[..., batch["vocab"]:] = garbage
        loss, _, _ = distillation_loss(x, teacher.float(), batch["target"], batch["mask"], TrOPDConfig(topk=16),
                                       vocab_size=batch["vocab"])
        loss.backward()
        grads.append((loss.item(), x.grad))
        assert not x.grad[..., batch["vocab"]:].any()
    assert grads[0][0] == grads[1][0]
    assert torch.equal(grads[0][1], grads[1][1])


def _call(**overrides):
    batch = make_batch(seed=6)
    args = dict(student_logits=batch["student"].float(), teacher=batch["teacher"].float(), target_ids=batch["target"],
                loss_mask=batch["mask"], config=TrOPDConfig(topk=8))
    kwargs = dict(vocab_size=batch["vocab"])
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return distillation_loss(*args.values(), **kwargs)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(target_ids=torch.zeros(2, 7, dtype=torch.long)), ValueError, "target_ids has shape"),
        (dict(target_ids=torch.zeros(2, 8)), TypeError, "target_ids must be an integer"),
        (dict(loss_mask=torch.ones(8, 2)), ValueError, "loss_mask has shape"),
        (dict(student_logits=torch.zeros(2, 8, 48, dtype=torch.long)), TypeError, "student_logits must be a floating"),
        (dict(student_logits=torch.zeros(16, 48)), ValueError, r"student_logits has shape \(16, 48\)"),
        (dict(teacher=torch.zeros(2, 8, 40)), ValueError, r"teacher \(logits shard\) has shape"),
        (dict(teacher="logits"), TypeError, "teacher must be a TeacherSignal"),
        (dict(prefix_mask=torch.zeros(2, 9, dtype=torch.bool)), ValueError, "prefix_mask has shape"),
        (dict(rollout_logprobs=torch.zeros(2, 8, dtype=torch.long)), TypeError, "rollout_logprobs must be a floating"),
        (dict(prefix_mask=torch.zeros(2, 8, dtype=torch.bool), config=OPDConfig()), ValueError,
         "prefix_mask is used by TrOPDConfig"),
        (dict(vocab_size=49), ValueError, "vocab_size=49 must be in"),
        (dict(config=TrOPDConfig(topk=64)), ValueError, "topk=64 must be in"),
    ],
)
def test_bad_arguments_are_named(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_out_of_range_target_at_a_loss_token_is_refused():
    batch = make_batch(seed=6)
    target = batch["target"].clone()
    target[1, 5] = batch["vocab"]  # a padding id
    with pytest.raises(ValueError, match="target_ids holds id 45 at a loss token"):
        _call(target_ids=target)


def test_compact_signal_errors():
    batch = make_batch(seed=6)
    sig = TeacherSignal.from_logits(batch["teacher"].float(), batch["target"], topk=4, vocab_size=batch["vocab"])
    with pytest.raises(ValueError, match="holds top-4; TrOPDConfig needs top-8"):
        _call(teacher=sig)
    with pytest.raises(ValueError, match="DenseKLConfig needs the teacher's logits shard"):
        _call(teacher=sig, config=DenseKLConfig())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TrOPDConfig(outlier="drop"), r"TrOPDConfig.outlier='drop'; expected one of \('clip', 'mask', 'fkl'\)"),
        (lambda: TrOPDConfig(trust="bernoulli"), "TrOPDConfig.trust='bernoulli'"),
        (lambda: TrOPDConfig(outlier_clip=0.5), "TrOPDConfig.outlier_clip=0.5; must be <= 0"),
        (lambda: EOPDConfig(topk_kl="bucket"), "EOPDConfig.topk_kl='bucket'"),
        (lambda: REOPOLDConfig(lam=1.5), r"REOPOLDConfig.lam=1.5; must be in \(0, 1\)"),
        (lambda: OPDConfig(ppo_clip=0.0), "OPDConfig.ppo_clip=0.0"),
        (lambda: DenseKLConfig("sideways"), "DenseKLConfig.direction='sideways'"),
    ],
)
def test_config_errors_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()

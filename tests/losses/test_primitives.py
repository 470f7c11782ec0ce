"""Every vocabulary primitive at TP = 1, 2, 4 against the fp64 full-vocabulary reference:
values, and gradients with respect to the student logits."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from support import reference as ref
from support.distributed import run_workers, shard, unshard
from tropd_megatron.losses import (
    TeacherSignal,
    dense_forward_kl,
    dense_reverse_kl,
    entropy,
    gather_logprobs,
    kl_estimators,
    log_softmax,
    log_softmax_stats,
    swap_token_logits,
    topk_forward_kl,
    vocab_parallel_topk,
)

B, S, VPAD, VOCAB = 2, 6, 48, 45  # 3 padded columns, all on the last rank at TP = 2 and 4
TOPKS = (7, 20)  # 20 > the 12-column shard at TP = 4
RTOL, ATOL = 1e-5, 1e-5  # fp32 shard arithmetic against the fp64 reference


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, VPAD, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, S, VPAD, generator=g, dtype=torch.float64) * 3
    # garbage in padded columns must not matter
    student[..., VOCAB:] = 50.0
    teacher[..., VOCAB:] = float("nan")
    return dict(
        student=student,
        teacher=teacher,
        ids=torch.randint(0, VOCAB, (B, S, 5), generator=g),
        weights=torch.rand(B, S, 5, generator=g, dtype=torch.float64),
        token_weights=torch.rand(B, S, generator=g, dtype=torch.float64),
        column_weights=torch.randn(B, S, VPAD, generator=g, dtype=torch.float64),
    )


def primitive_results(data, rank, world, group):
    """Values and local-shard gradients of every primitive on this rank's shard."""
    out = {}
    teacher = shard(data["teacher"], rank, world).float()

    def grad_of(fn):
        x = shard(data["student"], rank, world).float().requires_grad_(True)
        value, loss = fn(x)
        loss.backward()
        return value.detach(), x.grad

    def gather(x):
        lp, ent = gather_logprobs(x, data["ids"], tp_group=group, vocab_size=VOCAB)
        out["entropy_nograd"] = ent
        return lp, (lp * data["weights"].float()).sum()

    def lsm(x):
        v = log_softmax(x, tp_group=group, vocab_size=VOCAB)
        w = shard(data["column_weights"], rank, world).float()
        return v, torch.where(torch.isfinite(v), w * v, 0.0).sum()

    def per_token(fn):
        def run(x):
            v = fn(x)
            return v, (v * data["token_weights"].float()).sum()

        return run

    out["gather"] = grad_of(gather)
    out["log_softmax"] = grad_of(lsm)
    out["entropy"] = grad_of(per_token(lambda x: entropy(x, tp_group=group, vocab_size=VOCAB)))
    out["fkl"] = grad_of(per_token(lambda x: dense_forward_kl(x, teacher, tp_group=group, vocab_size=VOCAB)))
    out["rkl"] = grad_of(per_token(lambda x: dense_reverse_kl(x, teacher, tp_group=group, vocab_size=VOCAB)))
    student = shard(data["student"], rank, world).float()
    out["stats"] = log_softmax_stats(student, tp_group=group, vocab_size=VOCAB)
    for k in TOPKS:
        out[f"topk{k}"] = vocab_parallel_topk(student, k, tp_group=group, vocab_size=VOCAB)
    # NaN only in padded columns: every token stays valid
    sig = TeacherSignal.from_logits(teacher, data["ids"][..., 0], topk=7, tp_group=group, vocab_size=VOCAB)
    out["signal"] = [sig.token_logprobs, sig.entropy, sig.topk_ids, sig.topk_logprobs, sig.valid]
    entropy_nograd = out.pop("entropy_nograd").numpy()
    return {k: [v.detach().numpy() for v in vals] for k, vals in out.items()} | {"entropy_nograd": entropy_nograd}


def _worker(rank, world, data):
    return primitive_results(data, rank, world, dist.group.WORLD)


def _results(tp):
    data = make_data()
    if tp == 1:
        return data, [primitive_results(data, 0, 1, None)]
    return data, run_workers(_worker, tp, data)


def _full_grad(fn, student):
    x = student.clone().requires_grad_(True)
    value, loss = fn(x)
    loss.backward()
    return value.detach().numpy(), x.grad.numpy()


def _close(actual, expected, what, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_primitives_match_reference(tp):
    data, ranks = _results(tp)
    st, te = data["student"], data["teacher"]
    tw = data["token_weights"]

    def both(key):
        vals = [r[key] for r in ranks]
        for r in vals[1:]:  # replicated outputs must be identical on every rank
            np.testing.assert_array_equal(r[0], vals[0][0], err_msg=f"{key} differs across ranks")
        return vals[0][0], unshard([r[1] for r in vals])

    # log-probs of given ids, and the non-differentiable entropy returned beside them
    value, grad = both("gather")
    def gathered(x):
        lp = ref.log_probs(x, VOCAB).gather(-1, data["ids"])
        return lp, (lp * data["weights"]).sum()

    ev, eg = _full_grad(gathered, st)
    _close(value, ev, "gather_logprobs value")
    _close(grad, eg, "gather_logprobs grad")
    _close(ranks[0]["entropy_nograd"], ref.entropy(st, VOCAB).numpy(), "gather_logprobs entropy")

    # log-softmax: values on real columns, -inf on padding, gradient of a weighted sum
    value = unshard([r["log_softmax"][0] for r in ranks])
    grad = unshard([r["log_softmax"][1] for r in ranks])
    ev, eg = _full_grad(lambda x: (ref.log_probs(x, VOCAB),
                                   (data["column_weights"][..., :VOCAB] * ref.log_probs(x, VOCAB)).sum()), st)
    _close(value[..., :VOCAB], ev, "log_softmax value")
    assert np.isneginf(value[..., VOCAB:]).all()
    _close(grad, eg, "log_softmax grad")

    for key, fn in (
        ("entropy", lambda x: ref.entropy(x, VOCAB)),
        ("fkl", lambda x: ref.forward_kl(x, te.nan_to_num(0.0), VOCAB)),
        ("rkl", lambda x: ref.reverse_kl(x, te.nan_to_num(0.0), VOCAB)),
    ):
        value, grad = both(key)
        ev, eg = _full_grad(lambda x: (fn(x), (fn(x) * tw).sum()), st)
        _close(value, ev, f"{key} value")
        _close(grad, eg, f"{key} grad")
        assert np.all(grad[..., VOCAB:] == 0), f"{key}: padded columns got a gradient"

    top, lse = ranks[0]["stats"]
    full = st[..., :VOCAB]
    _close(top, full.max(-1).values.numpy(), "max")
    _close(lse, full.logsumexp(-1).numpy(), "logsumexp")

    lp = ref.log_probs(st, VOCAB)
    for k in TOPKS:
        ids, vals = ranks[0][f"topk{k}"]
        ev, ei = lp.topk(k, dim=-1)
        np.testing.assert_array_equal(ids, ei.numpy(), err_msg=f"top-{k} ids")
        _close(vals, ev.numpy(), f"top-{k} log-probs")

    tok, ent, tids, tlp, valid = ranks[0]["signal"]
    tl = ref.log_probs(te, VOCAB)
    _close(tok, tl.gather(-1, data["ids"][..., :1])[..., 0].numpy(), "signal token log-prob")
    _close(ent, ref.entropy(te, VOCAB).numpy(), "signal entropy")
    ev, ei = tl.topk(7, dim=-1)
    np.testing.assert_array_equal(tids, ei.numpy())
    assert tids.dtype == np.int32
    _close(tlp, ev.numpy(), "signal top-k log-probs")
    assert valid.all()


def _topk_one_rank_worker(rank, world, logits):
    return vocab_parallel_topk(shard(logits, rank, world), 6, tp_group=dist.group.WORLD)


def test_topk_merge_when_all_winners_sit_on_one_rank():
    logits = torch.randn(3, 40, dtype=torch.float64)
    logits[:, 20:26] += 30.0  # the top-6 all belong to rank 2 of 4 (columns 20..29)
    ranks = run_workers(_topk_one_rank_worker, 4, logits.float())
    ev, ei = torch.log_softmax(logits, -1).topk(6, -1)
    for ids, vals in ranks:
        np.testing.assert_array_equal(ids, ei.numpy())
        _close(vals, ev.numpy(), "top-k on one rank")


@pytest.mark.parametrize("variant", ["plain", "renormalised", "tail"])
def test_topk_forward_kl_variants(variant):
    g = torch.Generator().manual_seed(1)
    full_s = torch.log_softmax(torch.randn(4, 30, generator=g, dtype=torch.float64), -1)
    full_t = torch.log_softmax(torch.randn(4, 30, generator=g, dtype=torch.float64) * 2, -1)
    lq, ids = full_t.topk(8, -1)
    x = full_s.clone().requires_grad_(True)
    value = topk_forward_kl(x.gather(-1, ids), lq, variant)
    value.sum().backward()
    y = full_s.clone().requires_grad_(True)
    expected = ref.topk_fkl(y.gather(-1, ids), lq, variant)
    expected.sum().backward()
    _close(value.detach().numpy(), expected.detach().numpy(), variant, rtol=1e-10, atol=1e-12)
    _close(x.grad.numpy(), y.grad.numpy(), variant + " grad", rtol=1e-10, atol=1e-12)
    assert (value >= -1e-12).all(), "a KL must be non-negative"


def test_kl_estimators_are_unbiased_in_exact_expectation():
    # E_{y ~ p_S}[k1] = E[k3] = KL(p_S || p_T); k2 and k3 are non-negative. The expectation is
    # taken exactly, by enumerating the vocabulary with weights p_S.
    g = torch.Generator().manual_seed(2)
    lp = torch.log_softmax(torch.randn(5, 50, generator=g, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.randn(5, 50, generator=g, dtype=torch.float64), -1)
    k1, k2, k3 = kl_estimators(lq - lp)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    _close((lp.exp() * k1).sum(-1).numpy(), kl.numpy(), "k1", rtol=1e-12, atol=1e-12)
    _close((lp.exp() * k3).sum(-1).numpy(), kl.numpy(), "k3", rtol=1e-12, atol=1e-12)
    assert (k2 >= 0).all() and (k3 >= 0).all()


def _swap_worker(rank, world, logits, pairs):
    local = shard(logits, rank, world)
    return [swap_token_logits(local, a, b, tp_group=dist.group.WORLD if world > 1 else None) for a, b in pairs]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_swap_token_logits_exchanges_two_columns_across_shards(tp):
    logits = make_data()["student"]
    pairs = [(1, 40), (3, 5), (7, 7)]  # on different shards at TP > 1, on one shard, the same id
    got = run_workers(_swap_worker, tp, logits, pairs)
    for i, (a, b) in enumerate(pairs):
        expected = logits.clone()
        expected[..., [a, b]] = logits[..., [b, a]]
        np.testing.assert_array_equal(unshard([r[i] for r in got]), expected.numpy())

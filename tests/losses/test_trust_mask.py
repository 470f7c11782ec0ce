"""The stochastic trust mask: reproducible from its seed, independent of batch layout, and
with a trust fraction matching E[min(1, exp(r))]."""
import math

import torch

from support import reference as ref
from support.batches import make_batch
from tropd_megatron.losses import TrOPDConfig, distillation_loss, reduce_metrics, sequence_token_keys, token_uniforms


def draws(seed, step, ids, mask):
    return token_uniforms(seed, step, sequence_token_keys(ids, mask))


def _ids(seed=0, B=8, S=64, V=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g), torch.ones(B, S)


def test_uniforms_are_reproducible_and_depend_on_seed_and_step():
    ids, w = _ids()
    u = draws(3, 10, ids, w)
    assert torch.equal(u, draws(3, 10, ids, w))
    assert (u >= 0).all() and (u < 1).all()
    for other in (draws(4, 10, ids, w), draws(3, 11, ids, w)):
        assert (other != u).float().mean() > 0.99


def test_uniforms_follow_the_sequence_not_its_batch_index():
    ids, w = _ids()
    perm = torch.randperm(ids.shape[0])
    assert torch.equal(draws(0, 1, ids, w)[perm], draws(0, 1, ids[perm], w[perm]))
    # padding more positions on the right (mask 0) leaves the draws of real tokens unchanged
    padded = torch.cat([ids, torch.zeros_like(ids[:, :5])], 1)
    pw = torch.cat([w, torch.zeros_like(w[:, :5])], 1)
    assert torch.equal(draws(0, 1, padded, pw)[:, :64], draws(0, 1, ids, w))


def test_uniforms_look_uniform_and_independent():
    ids, w = _ids(B=64, S=256)  # 16384 draws
    u = draws(0, 0, ids, w).double().flatten()
    n = u.numel()
    # mean within 5 standard errors (sd of U(0,1) is 1/sqrt(12)); each decile within 5 sigma
    assert abs(u.mean().item() - 0.5) < 5 / math.sqrt(12 * n)
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert ((counts - n / 10).abs() < 5 * math.sqrt(n * 0.1 * 0.9)).all(), counts
    # neighbouring tokens uncorrelated: |corr| within 5 / sqrt(n)
    a, b = u.view(64, 256)[:, :-1].flatten(), u.view(64, 256)[:, 1:].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(a.numel())


def test_trust_fraction_matches_expected_acceptance_probability():
    """Given the log-ratios r, M_t ~ Bernoulli(P_t) independently, so the trusted count has
    mean sum P_t and variance sum P_t (1 - P_t); the observed count must lie within 5 standard
    deviations (a false failure has probability < 1e-6)."""
    batch = make_batch(seed=9, B=32, S=128, teacher_scale=1.5)
    config = TrOPDConfig(topk=8, seed=123)
    _, _, metrics = distillation_loss(batch["student"].float(), batch["teacher"].float(), batch["target"],
                                      batch["mask"], config, vocab_size=batch["vocab"], step=4)
    reduced = reduce_metrics(metrics)
    target = batch["target"].clamp_min(0)[..., None]
    r = (ref.log_probs(batch["teacher"], batch["vocab"]).gather(-1, target)
         - ref.log_probs(batch["student"], batch["vocab"]).gather(-1, target))[..., 0]
    p = r.clamp_max(0).exp()[batch["mask"] > 0]
    expected, sd = p.sum().item(), (p * (1 - p)).sum().sqrt().item()
    observed = reduced["trust_fraction"] * reduced["policy_tokens"]
    assert 0.05 < expected / p.numel() < 0.95, "the batch must mix trusted and outlier tokens"
    assert abs(observed - expected) < 5 * sd, (observed, expected, sd)


def test_the_random_control_keeps_the_rate_but_not_the_choice_of_tokens():
    """trust="random": the trusted count matches the stochastic mask's expected count (same
    rate, 5 sd), but trust no longer follows r_t: among the half of tokens with the higher r_t
    the stochastic mask trusts far more than among the lower half, the random one about the
    same (a control that used r_t per token fails the second check, one at another rate the first)."""
    batch = make_batch(seed=9, B=32, S=128, teacher_scale=1.5)
    args = (batch["student"].float(), batch["teacher"].float(), batch["target"], batch["mask"])
    target = batch["target"].clamp_min(0)[..., None]
    r = (ref.log_probs(batch["teacher"], batch["vocab"]).gather(-1, target)
         - ref.log_probs(batch["student"], batch["vocab"]).gather(-1, target))[..., 0]
    on = batch["mask"] > 0
    p = r.clamp_max(0).exp()[on]
    high = r[on] >= r[on].median()

    def mask_of(trust):
        from tropd_megatron.losses.objectives import TokenView, trust_mask

        keys = sequence_token_keys(batch["target"], batch["mask"])
        view = TokenView(*[None] * 3, log_ratio=r.float(), teacher_entropy=None, student_entropy=None,
                         rollout_logprob=None, trust_keys=keys, weight=batch["mask"].float())
        return trust_mask(TrOPDConfig(topk=8, seed=5, trust=trust), view, step=2)[on]

    stochastic, random = mask_of("stochastic"), mask_of("random")
    n = p.numel()
    rate = p.mean().item()
    assert abs(random.sum().item() - p.sum().item()) < 5 * math.sqrt(n * rate * (1 - rate))
    assert stochastic[high].mean() - stochastic[~high].mean() > 0.3
    assert abs(random[high].mean() - random[~high].mean()) < 5 * math.sqrt(2 * rate * (1 - rate) / (n / 2))
    assert torch.equal(random, mask_of("random"))  # reproducible
    assert (random != stochastic).float().mean() > 0.1  # not the stochastic draws
    _, _, metrics = distillation_loss(*args, TrOPDConfig(topk=8, seed=5, trust="random"), vocab_size=batch["vocab"],
                                      step=2)
    reduced = reduce_metrics(metrics)
    assert abs(reduced["trust_fraction"] - rate) < 5 * math.sqrt(rate * (1 - rate) / n)

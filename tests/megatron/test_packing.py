"""Packed micro-batches: rollouts of very different lengths bin-packed into rows, each
attending only to itself, give the padded layout's loss, metrics and parameter update (at
TP = 1, TP = 2, PP = 2 and DP = 2, with teacher prefixes and the stochastic trust mask), and
no sequence sees another."""
import os
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from support.distributed import run_workers

pytest.importorskip("megatron.core")

from support import step_models  # noqa: E402
from support.step_models import OBJECTIVE, VOCAB  # noqa: E402
from tropd_megatron.megatron import OptimConfig, ParallelConfig, build_gpt, build_student  # noqa: E402
from tropd_megatron.megatron import initialize, train_step  # noqa: E402
from tropd_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from tropd_megatron.megatron.rollout import Rollout, to_microbatches  # noqa: E402

EOS = 0
STUDENT, TEACHER = (replace(m, max_sequence_length=64) for m in (step_models.STUDENT, step_models.TEACHER))
ROW = 48  # tokens per packed row
RTOL, ATOL = 1e-4, 1e-6  # fp32: packing changes the attention's summation order and the micro-batch split


def rollouts(n=10, seed=0):
    """Prompts of 2-8 tokens, responses of 1-38 (most short), some with a teacher prefix."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 8))]
        total = min(38, max(1, int(4 * 2.7 ** rng.gauss(0, 1))))
        prefix = [rng.randrange(1, VOCAB) for _ in range(min(3, total - 1))] if i % 3 == 0 and total > 1 else []
        cont = [rng.randrange(1, VOCAB) for _ in range(total - len(prefix) - 1)] + [EOS]
        out.append(Rollout(prompt, prefix, cont, [-rng.random() for _ in cont], True))
    return out


def _init_worker(rank, world, root):
    initialize(ParallelConfig(), seed=0)
    save_checkpoint(os.path.join(root, "teacher"), 0, build_gpt(TEACHER, ParallelConfig(), frozen=True))
    save_checkpoint(os.path.join(root, "student"), 0, build_gpt(STUDENT, ParallelConfig()))


def _step_worker(rank, world, root, tp, pp, pack, sp=False):
    from megatron.core import parallel_state

    parallel = ParallelConfig(tp, pp, sequence_parallel=sp)
    initialize(parallel, seed=0)
    teacher = build_gpt(TEACHER, parallel, frozen=True)
    student = build_student(STUDENT, parallel, OptimConfig(optimizer="sgd", lr=0.5, clip_grad=0.0), total_steps=2)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), teacher)
    load_checkpoint(latest_checkpoint(os.path.join(root, "student")), student.model.module)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = rollouts()[dp_rank::dp]
    batches = to_microbatches(mine, 2, EOS, pack=pack, row_tokens=ROW, same_shape=pp > 1, multiple_of=tp if sp else 1)
    result = train_step(student, teacher, batches, OBJECTIVE, vocab_size=VOCAB, step=1, total_steps=2)
    save_checkpoint(os.path.join(root, f"after_tp{tp}pp{pp}dp{dp}{'sp' if sp else ''}_{'packed' if pack else 'padded'}"), 1,
                    student.model.module)
    padded = to_microbatches(mine, 2, EOS, same_shape=pp > 1)
    return dict(metrics=result.metrics, computed=sum(mb.tokens.numel() for mb in batches),
                computed_padded=sum(mb.tokens.numel() for mb in padded))


def _read_worker(rank, world, path):
    initialize(ParallelConfig(), seed=0)
    model = build_gpt(STUDENT, ParallelConfig())
    load_checkpoint(path, model)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("packing"))
    run_workers(_init_worker, 1, root)
    return root


def test_rollouts_of_very_different_lengths_pack_into_fewer_rows():
    rs = rollouts()
    lengths = sorted(len(r.prompt + r.prefix + r.continuation) - 1 for r in rs)
    assert lengths[-1] >= 6 * lengths[0] and any(r.prefix for r in rs)  # the long tail and prefixes are there
    padded = to_microbatches(rs, 2, EOS)
    packed = to_microbatches(rs, 2, EOS, pack=True, row_tokens=ROW, same_shape=False)
    assert sum(mb.tokens.numel() for mb in packed) < 0.6 * sum(mb.tokens.numel() for mb in padded)
    # every loss token keeps its label, trust key, rollout log-prob and prefix flag
    def loss_tokens(mbs):
        return sorted((int(lab), int(key), float(lp), bool(pre)) for mb in mbs for lab, key, lp, pre in zip(
            *(getattr(mb, name)[mb.loss_mask != 0] for name in ("labels", "trust_keys", "rollout_logprobs",
                                                                "prefix_mask"))))
    assert loss_tokens(packed) == loss_tokens(padded) and len(loss_tokens(padded)) > 50
    with pytest.raises(ValueError, match="does not fit a packed row of rollout.row_tokens=10"):
        to_microbatches(rs, 2, EOS, pack=True, row_tokens=10)


@pytest.mark.timeout(300)
def test_packed_steps_equal_padded_at_tp_pp_dp(initial):
    """One step (teacher pass + student forward/backward + SGD) on packed micro-batches gives
    the padded TP = 1 step's loss, metrics and update, at TP = 1, TP = 2, PP = 2, DP = 2 and
    TP = 2 with sequence parallelism."""
    reference = run_workers(_step_worker, 1, initial, 1, 1, False)[0]
    before = run_workers(_read_worker, 1, os.path.join(initial, "student", "step_00000000"))[0]
    expected = run_workers(_read_worker, 1, os.path.join(initial, "after_tp1pp1dp1_padded", "step_00000001"))[0]
    m = reference["metrics"]
    assert m["prefix_tokens"] > 0 and 0 < m["trust_fraction"] < 1
    for tp, pp, dp, sp in ((1, 1, 1, False), (2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, False), (2, 1, 1, True)):
        what = f"packed TP={tp} PP={pp} DP={dp}{' SP' if sp else ''}"
        ranks = run_workers(_step_worker, tp * pp * dp, initial, tp, pp, True, sp, timeout=150)
        got = ranks[-1]["metrics"]  # a last pipeline stage, reduced over data-parallel ranks
        assert set(got) == set(m), what
        for key in m:
            np.testing.assert_allclose(got[key], m[key], rtol=RTOL, atol=ATOL, err_msg=f"{what} {key}")
        after = run_workers(_read_worker, 1, os.path.join(initial, f"after_tp{tp}pp{pp}dp{dp}{'sp' if sp else ''}_packed",
                                                          "step_00000001"))[0]
        for k in expected:
            np.testing.assert_allclose(after[k] - before[k], expected[k] - before[k], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{what} update of {k}")
        assert ranks[0]["computed"] < ranks[0]["computed_padded"], what  # this rank's rollouts, padded


def _boundary_worker(rank, world):
    from megatron.core import parallel_state

    from tropd_megatron.losses import gather_logprobs

    initialize(ParallelConfig(2, 1), seed=0)
    model = build_gpt(STUDENT, ParallelConfig(2, 1), frozen=True)
    group = parallel_state.get_tensor_model_parallel_group()
    rng = random.Random(5)
    seqs = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (7, 12, 9)]

    def logprobs(rows):
        """[log p(label) of each of ``rows``], all packed into one row (at offsets the packing chose)."""
        rs = [Rollout(s[:2], [], s[2:], [0.0] * (len(s) - 2), False) for s in rows]
        (mb,) = to_microbatches(rs, 1, EOS, pack=True, row_tokens=ROW, same_shape=False)
        assert mb.tokens.shape[0] == 1 and int(mb.segments.max()) == len(rows)  # one row, all of them
        with torch.no_grad():
            logits = mb.logits_view(model(*mb.model_inputs()))
        lp, _ = gather_logprobs(logits, mb.labels[..., None], tp_group=group, vocab_size=VOCAB)
        segments = mb.segments[0]
        found = {tuple(mb.tokens[0, segments == k].tolist()): lp[0, segments == k, 0] for k in range(1, len(rows) + 1)}
        return [found[tuple(s[:-1])] for s in rows]

    other = [(t * 7 + 3) % (VOCAB - 1) + 1 for t in seqs[1]]
    return dict(packed=logprobs(seqs), changed=logprobs([seqs[0], other, seqs[2]]),
                alone=[logprobs([s])[0] for s in seqs])


def test_no_attention_across_a_sequence_boundary():
    """Changing the middle sequence of a row leaves the others' log-probs unchanged; each
    sequence packed at an offset gets the log-probs it gets alone at position 0 (RoPE is
    relative; the block-diagonal mask confines it), at TP = 2."""
    r = run_workers(_boundary_worker, 2)[0]
    for i in (0, 2):
        np.testing.assert_array_equal(r["changed"][i], r["packed"][i])
    assert np.abs(r["changed"][1] - r["packed"][1]).max() > 1e-2
    for packed, alone in zip(r["packed"], r["alone"]):
        np.testing.assert_allclose(packed, alone, rtol=0, atol=1e-5)

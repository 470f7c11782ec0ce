"""Generation with Megatron's inference engine from the live model, on CPU (gloo)."""
import numpy as np
import pytest
import torch

from distributed import run_workers

pytest.importorskip("megatron.core")

from tropd_megatron.losses import gather_logprobs  # noqa: E402
from tropd_megatron.megatron import MicroBatch, ModelConfig, ParallelConfig, build_gpt, initialize  # noqa: E402
from tropd_megatron.megatron.inference import Generator, SamplingConfig  # noqa: E402

EOS = 0
CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                     vocab_size=60, padded_vocab_size=64, max_sequence_length=32, init_method_std=0.3)
PROMPTS = [[5, 7, 9], [11, 3, 4, 8, 2], [1, 2]]
# generation and training run the same fp32 model; they differ only in attention kernels
# (KV cache vs full sequence) and summation order
LOGPROB_ATOL = 1e-4


NEVER = 63  # a padded vocabulary row: never generated, so an end token that never stops anything
BUDGET = 6


def end_token_at_a_known_step(free: list) -> tuple[int, int]:
    """(token, k): the first token of the greedy continuation ``free`` that appears there for
    the first time at a step k >= 1. Greedy decoding does not depend on which id ends a
    sequence, so with that token as the end token the same model stops at step k."""
    for k in range(1, len(free)):
        if free[k] not in free[:k]:
            return free[k], k
    raise AssertionError(f"no token of {free} can end it after step 0")


def _forward_logprobs(model, prompt, generated, tp):
    """The training forward's log-probs of ``generated`` after ``prompt``, and its argmax at the
    first generated position."""
    from megatron.core import parallel_state

    full = torch.tensor([prompt + generated])
    tokens, labels = full[:, :-1], full[:, 1:]
    with torch.no_grad():
        logits = model(*MicroBatch(tokens, labels, torch.ones_like(labels)).model_inputs())
    group = parallel_state.get_tensor_model_parallel_group()
    lp, _ = gather_logprobs(logits, labels[..., None], tp_group=group, vocab_size=CONFIG.vocab_size)
    first = logits[0, len(prompt) - 1]  # local shard: take the global argmax over ranks
    parts = [torch.empty_like(first) for _ in range(tp)]
    torch.distributed.all_gather(parts, first, group=group)
    return lp[0, len(prompt) - 1 :, 0].tolist(), int(torch.cat(parts)[: CONFIG.vocab_size].argmax())


def _worker(rank, world, tp):
    initialize(ParallelConfig(tp, 1), seed=0)  # CPU init: the same weights at any TP size
    model = build_gpt(CONFIG, ParallelConfig(tp, 1))
    gen = Generator(model, CONFIG, eos_id=EOS, max_batch_size=2)
    greedy = gen.generate(PROMPTS, SamplingConfig(top_k=1, max_new_tokens=BUDGET))
    sampled = [gen.generate(PROMPTS, SamplingConfig(temperature=1.0, max_new_tokens=BUDGET), seed=s)
               for s in (3, 3, 4)]
    assert model.training, "the model is back in train mode after generation"

    # the end token: unused, then one the model emits greedily at a known step
    free = Generator(model, CONFIG, eos_id=NEVER, max_batch_size=2).generate(
        PROMPTS, SamplingConfig(top_k=1, max_new_tokens=BUDGET))
    end, k = end_token_at_a_known_step(free[0].tokens)
    ending = Generator(model, CONFIG, eos_id=end, max_batch_size=2)
    ended = ending.generate(PROMPTS, SamplingConfig(top_k=1, max_new_tokens=BUDGET))
    cut = ending.generate(PROMPTS[:1], SamplingConfig(top_k=1, max_new_tokens=k))  # the budget ends first
    forward = [_forward_logprobs(model, p, g.tokens, tp) for p, g in zip(PROMPTS, greedy)]
    return dict(
        greedy=[g.tokens for g in greedy], greedy_logprobs=[g.logprobs for g in greedy],
        stopped=[g.stopped for g in greedy], forward_logprobs=[f[0] for f in forward],
        argmax_first=[f[1] for f in forward], sampled=[[g.tokens for g in run] for run in sampled],
        free=[g.tokens for g in free], free_stopped=[g.stopped for g in free], end=end, k=k,
        ended=[g.tokens for g in ended], ended_stopped=[g.stopped for g in ended],
        ended_logprobs=[g.logprobs for g in ended],
        ended_forward=[_forward_logprobs(model, p, g.tokens, tp)[0] for p, g in zip(PROMPTS, ended)],
        cut=cut[0].tokens, cut_stopped=cut[0].stopped, cut_logprobs=len(cut[0].logprobs),
    )


@pytest.fixture(scope="module")
def runs():
    return {tp: run_workers(_worker, tp, tp) for tp in (1, 2)}


def test_greedy_generation_is_identical_at_tp1_and_tp2(runs):
    tp1, tp2 = runs[1][0], runs[2]
    assert all(r["greedy"] == tp1["greedy"] for r in tp2)
    assert any(len(t) > 1 for t in tp1["greedy"])
    for tokens, stopped in zip(tp1["greedy"], tp1["stopped"]):
        assert stopped == (tokens[-1] == EOS) and (stopped or len(tokens) == BUDGET)


def test_padded_vocabulary_ids_are_never_generated(runs):
    for tp in (1, 2):
        for rank in runs[tp]:
            for tokens in rank["greedy"] + [t for run in rank["sampled"] for t in run]:
                assert max(tokens) < CONFIG.vocab_size, tokens


def test_first_greedy_token_is_the_argmax_of_a_plain_forward(runs):
    for tp in (1, 2):
        r = runs[tp][0]
        assert [t[0] for t in r["greedy"]] == r["argmax_first"]


def test_generation_logprobs_equal_the_training_forward(runs):
    """What keeps OPD on-policy: the rollout's log-probs are the trained model's."""
    for tp in (1, 2):
        r = runs[tp][0]
        for got, expected in zip(r["greedy_logprobs"], r["forward_logprobs"]):
            np.testing.assert_allclose(got, expected, atol=LOGPROB_ATOL, rtol=0)


def test_a_sequence_that_stops_ends_with_the_end_token_and_its_logprob(runs):
    """A model that emits the end token at a known step: its tokens end with it, with its
    log-prob (equal to the training forward's), and ``stopped`` is true; every prompt of the
    batch (of three lengths, two batches) stops exactly where its unended continuation first
    has the end token."""
    for tp in (1, 2):
        r = runs[tp][0]
        assert not any(r["free_stopped"]) and all(len(t) == BUDGET for t in r["free"])
        end, k = r["end"], r["k"]
        assert r["ended"][0] == r["free"][0][: k + 1] and r["ended"][0][-1] == end and r["ended_stopped"][0]
        for free, tokens, stopped in zip(r["free"], r["ended"], r["ended_stopped"]):
            expected = free[: free.index(end) + 1] if end in free else free
            assert tokens == expected and stopped == (end in free), (free, tokens, end)
        for got, expected in zip(r["ended_logprobs"], r["ended_forward"]):
            assert len(got) == len(expected)  # one log-prob per token, the end token's included
            np.testing.assert_allclose(got, expected, atol=LOGPROB_ATOL, rtol=0)
        assert all(rank["ended"] == r["ended"] for rank in runs[tp])
    assert runs[1][0]["ended"] == runs[2][0]["ended"]


def test_a_budget_that_ends_first_leaves_no_end_token_and_does_not_stop(runs):
    for tp in (1, 2):
        r = runs[tp][0]
        assert r["cut"] == r["free"][0][: r["k"]] and r["end"] not in r["cut"]
        assert not r["cut_stopped"] and r["cut_logprobs"] == r["k"]


def test_seeded_sampling_is_reproducible(runs):
    for tp in (1, 2):
        for rank in runs[tp]:
            same_a, same_b, other = rank["sampled"]
            assert same_a == same_b
            assert other != same_a
        assert all(rank["sampled"] == runs[tp][0]["sampled"] for rank in runs[tp])  # TP ranks agree

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


def _worker(rank, world, tp):
    from megatron.core import parallel_state

    initialize(ParallelConfig(tp, 1), seed=0)  # CPU init: the same weights at any TP size
    model = build_gpt(CONFIG, ParallelConfig(tp, 1))
    gen = Generator(model, CONFIG, eos_id=EOS, max_batch_size=2)
    greedy = gen.generate(PROMPTS, SamplingConfig(top_k=1, max_new_tokens=6))
    sampled = [gen.generate(PROMPTS, SamplingConfig(temperature=1.0, max_new_tokens=6), seed=s) for s in (3, 3, 4)]
    assert model.training, "the model is back in train mode after generation"

    # the training forward's log-probs of the generated tokens
    forward_logprobs, argmax_first = [], []
    for prompt, g in zip(PROMPTS, greedy):
        full = torch.tensor([prompt + g.tokens])
        tokens, labels = full[:, :-1], full[:, 1:]
        with torch.no_grad():
            logits = model(*MicroBatch(tokens, labels, torch.ones_like(labels)).model_inputs())
        lp, _ = gather_logprobs(logits, labels[..., None], tp_group=parallel_state.get_tensor_model_parallel_group(),
                                vocab_size=CONFIG.vocab_size)
        forward_logprobs.append(lp[0, len(prompt) - 1 :, 0].tolist())
        first = logits[0, len(prompt) - 1]  # local shard: take the global argmax over ranks
        parts = [torch.empty_like(first) for _ in range(tp)]
        torch.distributed.all_gather(parts, first, group=parallel_state.get_tensor_model_parallel_group())
        argmax_first.append(int(torch.cat(parts)[: CONFIG.vocab_size].argmax()))
    return dict(
        greedy=[g.tokens for g in greedy], greedy_logprobs=[g.logprobs for g in greedy],
        stopped=[g.stopped for g in greedy], forward_logprobs=forward_logprobs, argmax_first=argmax_first,
        sampled=[[g.tokens for g in run] for run in sampled],
    )


@pytest.fixture(scope="module")
def runs():
    return {tp: run_workers(_worker, tp, tp) for tp in (1, 2)}


def test_greedy_generation_is_identical_at_tp1_and_tp2(runs):
    tp1, tp2 = runs[1][0], runs[2]
    assert all(r["greedy"] == tp1["greedy"] for r in tp2)
    assert any(len(t) > 1 for t in tp1["greedy"])
    for tokens, stopped in zip(tp1["greedy"], tp1["stopped"]):
        assert stopped == (tokens[-1] == EOS) and (stopped or len(tokens) == 6)


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


def test_seeded_sampling_is_reproducible(runs):
    for tp in (1, 2):
        for rank in runs[tp]:
            same_a, same_b, other = rank["sampled"]
            assert same_a == same_b
            assert other != same_a
        assert all(rank["sampled"] == runs[tp][0]["sampled"] for rank in runs[tp])  # TP ranks agree

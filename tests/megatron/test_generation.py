"""Generation with Megatron's inference engines (dynamic and static) from the live model, on
CPU (gloo), at TP = 1 and TP = 2."""
import numpy as np
import pytest
import torch

from support.distributed import run_workers

pytest.importorskip("megatron.core")

from tropd_megatron.losses import gather_logprobs  # noqa: E402
from tropd_megatron.megatron import MicroBatch, ModelConfig, ParallelConfig, build_gpt, initialize  # noqa: E402
from tropd_megatron.megatron.inference import EngineConfig, Generator, NonFiniteLogits, SamplingConfig  # noqa: E402
from tropd_megatron.planner import kv_token_bytes  # noqa: E402

EOS = 0
CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                     vocab_size=60, padded_vocab_size=64, max_sequence_length=32, init_method_std=0.3)
# three lengths, two engine batches on the static engine; budgets differ within one call
PROMPTS = [[5, 7, 9], [11, 3, 4, 8, 2], [1, 2], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]]
BUDGETS = [6, 3, 8, 5]
# generation and training run the same fp32 model; they differ only in attention kernels
# (KV cache vs full sequence) and summation order
LOGPROB_ATOL = 1e-4
# Greedy tokens are compared exactly across engines, TP / SP / PP layouts and queueing. That is
# sound on any CPU only where no position is a near-tie: every greedy position of these prompts
# has its two largest logits at least MARGIN apart (checked below), far above the rounding that
# kernels and layouts put into a logit (under 1e-5 here).
MARGIN = 1e-2
NEVER = 63  # a padded vocabulary row: never generated, so an end token that never stops anything
BUDGET = 6
ENGINES = ("dynamic", "static")


def engine(name, **settings):
    return EngineConfig(name, **{"max_requests": 2, "kv_cache_gib": 0.001, "block_size_tokens": 256, **settings})


def end_token_at_a_known_step(free: list) -> tuple[int, int]:
    """(token, k): the first token of the greedy continuation ``free`` that appears there for
    the first time at a step k >= 1. Greedy decoding does not depend on which id ends a
    sequence, so with that token as the end token the same model stops at step k."""
    for k in range(1, len(free)):
        if free[k] not in free[:k]:
            return free[k], k
    raise AssertionError(f"no token of {free} can end it after step 0")


def _forward(model, prompt, generated, tp):
    """The training forward over prompt + generated: the log-probs of ``generated``, the
    argmax at every generated position (gathered over TP ranks) and the smallest gap there
    between the two largest logits."""
    from megatron.core import parallel_state

    sequence = prompt + generated
    n = len(sequence) - 1
    full = torch.tensor([sequence + [0] * (-n % tp)])  # sequence parallelism splits positions over TP (causal:
    tokens, labels = full[:, :-1], full[:, 1:]         # the padding at the end changes nothing before it)
    with torch.no_grad():
        logits = model(*MicroBatch(tokens, labels, torch.ones_like(labels)).model_inputs())[:, :n]
    labels = labels[:, :n]
    group = parallel_state.get_tensor_model_parallel_group()
    lp, _ = gather_logprobs(logits, labels[..., None], tp_group=group, vocab_size=CONFIG.vocab_size)
    positions = logits[0, len(prompt) - 1 :].contiguous()  # local shards: the argmax is over all ranks
    parts = [torch.empty_like(positions) for _ in range(tp)]
    torch.distributed.all_gather(parts, positions, group=group)
    full_rows = torch.cat(parts, dim=-1)[:, : CONFIG.vocab_size]
    top2 = full_rows.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min()) if len(generated) else float("inf")
    return lp[0, len(prompt) - 1 :, 0].tolist(), full_rows.argmax(-1).tolist(), margin


def _worker(rank, world, tp, name, sp=False):
    initialize(ParallelConfig(tp, 1), seed=0)  # CPU init: the same weights at any TP size
    model = build_gpt(CONFIG, ParallelConfig(tp, 1, sequence_parallel=sp))
    gen = Generator(model, CONFIG, eos_id=EOS, engine=engine(name))
    greedy = gen.generate(PROMPTS, SamplingConfig(top_k=1), max_new_tokens=BUDGETS)
    greedy_forwards = gen.stats.forward_passes
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=BUDGET)
    sampled = [gen.generate(PROMPTS, sampling, seed=s) for s in (3, 3, 4)]
    alone = gen.generate(PROMPTS[:1], sampling, seed=3)  # the first request without the others
    assert model.training, "the model is back in train mode after generation"

    # the end token: unused, then one the model emits greedily at a known step
    free = Generator(model, CONFIG, eos_id=NEVER, engine=engine(name)).generate(
        PROMPTS, SamplingConfig(top_k=1, max_new_tokens=BUDGET))
    end, k = end_token_at_a_known_step(free[0].tokens)
    ending = Generator(model, CONFIG, eos_id=end, engine=engine(name))
    ended = ending.generate(PROMPTS, SamplingConfig(top_k=1, max_new_tokens=BUDGET))
    cut = ending.generate(PROMPTS[:1], SamplingConfig(top_k=1, max_new_tokens=k))  # the budget ends first

    # KV memory for one or two requests at a time (blocks of 8 tokens): the rest wait in the queue
    block = kv_token_bytes(CONFIG, tensor=tp, pipeline=1) * 8
    small = Generator(model, CONFIG, eos_id=EOS, engine=engine(name, max_requests=4, block_size_tokens=8,
                                                               kv_cache_gib=7 * block / 2**30))
    queued = small.generate(PROMPTS * 2, SamplingConfig(top_k=1), max_new_tokens=BUDGETS * 2)

    forward = [_forward(model, p, g.tokens, tp) for p, g in zip(PROMPTS, greedy)]
    free_margins = [_forward(model, p, g.tokens, tp)[2] for p, g in zip(PROMPTS, free)]
    sampled_forward = [_forward(model, p, g.tokens, tp)[0] for p, g in zip(PROMPTS, sampled[0])]
    ended_forward = [_forward(model, p, g.tokens, tp)[0] for p, g in zip(PROMPTS, ended)]
    with torch.no_grad():  # a NaN weight: refused naming the model, not failing inside the sampler
        model.output_layer.weight[0, 0] = float("nan")
    try:
        Generator(model, CONFIG, eos_id=EOS, engine=engine(name), name="teacher").generate(
            PROMPTS[:1], SamplingConfig(top_k=1, max_new_tokens=2))
        refused = ""
    except NonFiniteLogits as e:
        refused = str(e)
    return dict(
        greedy=[g.tokens for g in greedy], greedy_logprobs=[g.logprobs for g in greedy],
        stopped=[g.stopped for g in greedy], forward_logprobs=[f[0] for f in forward],
        forward_argmax=[f[1] for f in forward], margins=[f[2] for f in forward] + free_margins,
        sampled=[[g.tokens for g in run] for run in sampled],
        sampled_logprobs=[g.logprobs for g in sampled[0]], sampled_forward=sampled_forward, alone=alone[0].tokens,
        free=[g.tokens for g in free], free_stopped=[g.stopped for g in free], end=end, k=k,
        ended=[g.tokens for g in ended], ended_stopped=[g.stopped for g in ended],
        ended_logprobs=[g.logprobs for g in ended],
        ended_forward=ended_forward,
        cut=cut[0].tokens, cut_stopped=cut[0].stopped, cut_logprobs=len(cut[0].logprobs),
        queued=[g.tokens for g in queued], queued_logprobs=[g.logprobs for g in queued],
        queued_kv=small.stats.kv_bytes, queued_forwards=small.stats.forward_passes,
        greedy_forwards=greedy_forwards, block=block, refused=refused,
    )


@pytest.fixture(scope="module")
def runs():
    return {(name, tp): run_workers(_worker, tp, tp, name, timeout=150) for name in ENGINES for tp in (1, 2)}


def test_the_dynamic_engine_with_sequence_parallelism(runs):
    """TP = 2 with sequence parallelism (the GPU recipes' layout) generates TP = 1's tokens and
    log-probs, stops at the end token and queues beyond its KV memory as without it. (Megatron's
    static engine refuses sequence parallelism for dense models; the configuration check says so.)"""
    sp = run_workers(_worker, 2, 2, "dynamic", True, timeout=150)[0]
    plain = runs[("dynamic", 1)][0]
    for key in ("greedy", "ended", "cut", "queued", "sampled"):
        assert sp[key] == runs[("dynamic", 2)][0][key], key
    assert sp["greedy"] == plain["greedy"] and sp["ended"] == plain["ended"]
    for got, expected in zip(sp["greedy_logprobs"], plain["forward_logprobs"]):
        np.testing.assert_allclose(got, expected, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("name", ENGINES)
def test_greedy_tokens_are_the_argmax_of_a_plain_forward(runs, name):
    """Every greedy token, for prompts of four lengths with four budgets in one call, is the
    argmax of the training forward over prompt + tokens so far."""
    r = runs[(name, 1)][0]
    for tokens, argmax, budget, stopped in zip(r["greedy"], r["forward_argmax"], BUDGETS, r["stopped"]):
        assert tokens == argmax, (tokens, argmax)
        assert len(tokens) == budget or stopped


def test_no_greedy_position_is_a_near_tie(runs):
    """The premise of every exact greedy comparison in this file (the greedy and unended
    continuations, of which the ended, cut and queued ones are parts): rounding cannot flip a
    token there on any CPU, so a token that differs is a bug."""
    for (name, tp), ranks in runs.items():
        assert min(ranks[0]["margins"]) > MARGIN, (name, tp, ranks[0]["margins"])


def test_engines_and_tp_sizes_generate_the_same_greedy_tokens(runs):
    reference = runs[("static", 1)][0]["greedy"]
    for key, ranks in runs.items():
        assert all(r["greedy"] == reference for r in ranks), key


@pytest.mark.parametrize("name", ENGINES)
def test_padded_vocabulary_ids_are_never_generated(runs, name):
    for tp in (1, 2):
        for rank in runs[(name, tp)]:
            for tokens in rank["greedy"] + [t for run in rank["sampled"] for t in run]:
                assert max(tokens) < CONFIG.vocab_size, tokens


@pytest.mark.parametrize("name", ENGINES)
def test_generation_logprobs_equal_the_training_forward(runs, name):
    """What keeps OPD on-policy: the rollout's log-probs are the trained model's."""
    for tp in (1, 2):
        r = runs[(name, tp)][0]
        pairs = zip(r["greedy_logprobs"] + r["sampled_logprobs"], r["forward_logprobs"] + r["sampled_forward"])
        for got, expected in pairs:  # greedy and sampled (temperature 1) tokens
            assert len(got) == len(expected)
            np.testing.assert_allclose(got, expected, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("name", ENGINES)
def test_a_sequence_that_stops_ends_with_the_end_token_and_its_logprob(runs, name):
    """A model that emits the end token at a known step: its tokens end with it, with its
    log-prob (equal to the training forward's), and ``stopped`` is true; every prompt of the
    call stops exactly where its unended continuation first has the end token."""
    for tp in (1, 2):
        r = runs[(name, tp)][0]
        assert not any(r["free_stopped"]) and all(len(t) == BUDGET for t in r["free"])
        end, k = r["end"], r["k"]
        assert r["ended"][0] == r["free"][0][: k + 1] and r["ended"][0][-1] == end and r["ended_stopped"][0]
        for free, tokens, stopped in zip(r["free"], r["ended"], r["ended_stopped"]):
            expected = free[: free.index(end) + 1] if end in free else free
            assert tokens == expected and stopped == (end in free), (free, tokens, end)
        for got, expected in zip(r["ended_logprobs"], r["ended_forward"]):
            assert len(got) == len(expected)  # one log-prob per token, the end token's included
            np.testing.assert_allclose(got, expected, atol=LOGPROB_ATOL, rtol=0)
        assert all(rank["ended"] == r["ended"] for rank in runs[(name, tp)])


@pytest.mark.parametrize("name", ENGINES)
def test_a_budget_that_ends_first_leaves_no_end_token_and_does_not_stop(runs, name):
    for tp in (1, 2):
        r = runs[(name, tp)][0]
        assert r["cut"] == r["free"][0][: r["k"]] and r["end"] not in r["cut"]
        assert not r["cut_stopped"] and r["cut_logprobs"] == r["k"]


@pytest.mark.parametrize("name", ENGINES)
def test_seeded_sampling_is_reproducible(runs, name):
    for tp in (1, 2):
        for rank in runs[(name, tp)]:
            same_a, same_b, other = rank["sampled"]
            assert same_a == same_b
            assert other != same_a
        assert all(rank["sampled"] == runs[(name, tp)][0]["sampled"] for rank in runs[(name, tp)])  # TP ranks agree


def test_a_requests_samples_depend_on_the_requests_beside_it(runs):
    """Megatron's engines draw every request's token from one generator per step, so a
    request's samples depend on which requests share its steps (documented in the README):
    the first prompt sampled alone differs from the same prompt sampled with three others."""
    for name in ENGINES:
        r = runs[(name, 1)][0]
        assert r["alone"] != r["sampled"][0][0], name


def test_requests_beyond_the_kv_memory_wait_and_finish_correctly(runs):
    """Eight requests, KV blocks for one or two at a time: every request finishes with the
    tokens and log-probs it gets with memory to spare."""
    for tp in (1, 2):
        r = runs[("dynamic", tp)][0]
        assert r["queued"] == r["greedy"] * 2
        for got, expected in zip(r["queued_logprobs"], r["greedy_logprobs"] * 2):
            np.testing.assert_allclose(got, expected, atol=LOGPROB_ATOL, rtol=0)
        assert 0 < r["queued_kv"] <= 6 * r["block"]  # never more than the buffer's blocks


def test_continuous_batching_takes_fewer_forwards_than_static_batches(runs):
    """Four prompts of budgets 6 / 3 / 8 / 5, two at a time: the static engine decodes each
    batch to its longest budget; the dynamic engine refills a finished slot at once."""
    assert runs[("dynamic", 1)][0]["greedy_forwards"] < runs[("static", 1)][0]["greedy_forwards"]


@pytest.mark.parametrize("name", ENGINES)
def test_nonfinite_logits_are_refused_naming_the_model(runs, name):
    assert runs[(name, 1)][0]["refused"].startswith("teacher: NaN or +inf logits while generating")


def _pipeline_worker(rank, world, root, pp):
    from tropd_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    initialize(ParallelConfig(1, pp), seed=0)
    model = build_gpt(CONFIG, ParallelConfig(1, pp))
    if pp == 1:
        save_checkpoint(root, 0, model)
    else:
        load_checkpoint(latest_checkpoint(root), model)  # the PP = 1 weights, split over two stages
    out = {}
    for name in ENGINES:
        gen = Generator(model, CONFIG, eos_id=EOS, engine=engine(name))
        out[name] = [(g.tokens, g.logprobs) for g in gen.generate(PROMPTS, SamplingConfig(top_k=1),
                                                                  max_new_tokens=BUDGETS)]
    return out


def test_both_engines_generate_across_pipeline_stages(tmp_path):
    """PP = 2 (the logits broadcast from the last stage): the tokens and log-probs of PP = 1."""
    reference = run_workers(_pipeline_worker, 1, str(tmp_path), 1)[0]
    for rank in run_workers(_pipeline_worker, 2, str(tmp_path), 2, timeout=150):
        for name in ENGINES:
            assert [t for t, _ in rank[name]] == [t for t, _ in reference[name]], name
            for (_, got), (_, expected) in zip(rank[name], reference[name]):
                np.testing.assert_allclose(got, expected, atol=LOGPROB_ATOL, rtol=0)


def _engine_tensors(root) -> list:
    """Weak references to the tensors reachable from ``root`` without entering a module (the
    model's parameters and caches are not the engine's) nor a function or module (their
    globals lead to process-wide state such as the RNG tracker's)."""
    import gc
    import types
    import weakref

    seen, found, todo = set(), [], [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (torch.nn.Module, type, types.FunctionType, types.ModuleType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(weakref.ref(obj))
        else:
            todo.extend(gc.get_referents(obj))
    return found


def _release_worker(rank, world, name):
    import gc

    initialize(ParallelConfig(1, 1), seed=0)
    model = build_gpt(CONFIG, ParallelConfig(1, 1))
    gen = Generator(model, CONFIG, eos_id=EOS, engine=engine(name))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=BUDGET)
    first = gen.generate(PROMPTS, sampling, seed=3)
    held = _engine_tensors(gen._engine)
    held_bytes = sum(ref().numel() * ref().element_size() for ref in held)
    gen.release()
    gc.collect()
    alive = sum(ref().numel() * ref().element_size() for ref in held if ref() is not None)
    again = gen.generate(PROMPTS, sampling, seed=3)
    return held_bytes, alive, [g.tokens for g in first] == [g.tokens for g in again], \
        [g.logprobs for g in first] == [g.logprobs for g in again]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ENGINES)
def test_release_frees_the_kv_cache_and_the_next_call_samples_the_same(name):
    """Between rollouts and training the trainer releases both generators: every tensor the
    engine kept after generating (its KV cache, the static engine's per layer) is freed, and
    the next call, which builds the engine again, gives the same samples and log-probs."""
    held, alive, same_tokens, same_logprobs = run_workers(_release_worker, 1, name, timeout=100)[0]
    kv_floor = 2 * CONFIG.num_layers * CONFIG.num_query_groups * CONFIG.head_dim * 4  # K and V of one token, fp32
    assert held >= kv_floor and alive == 0 and same_tokens and same_logprobs


def _sizing_worker(rank, world, free_blocks):
    from tropd_megatron.megatron.inference import size_kv_caches

    initialize(ParallelConfig(1, 1), seed=0)
    model = build_gpt(CONFIG, ParallelConfig(1, 1))
    shared = engine("dynamic", max_requests=4, block_size_tokens=8, kv_cache_free_fraction=0.5)
    student = Generator(model, CONFIG, eos_id=EOS, engine=shared, name="student")  # requests of 32 tokens
    teacher = Generator(model, CONFIG, eos_id=EOS, engine=shared, max_request_tokens=16, name="teacher")
    block = 8 * kv_token_bytes(CONFIG, tensor=1, pipeline=1)
    demands = student.kv_cache_demand() // block, teacher.kv_cache_demand() // block
    size_kv_caches([student, teacher], free_bytes=free_blocks * block)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=BUDGET)
    held = []
    for gen in (student, teacher):
        gen.generate(PROMPTS[:3], sampling, seed=3)  # the teacher's requests: up to 16 tokens
        buffer = gen._engine.context.memory_buffer  # the KV blocks
        held.append(buffer.numel() * buffer.element_size() // block)
    configs = [(g.engine_config.kv_cache_gib * 2**30 / block, g.engine_config.kv_cache_free_fraction)
               for g in (student, teacher)]
    return demands, configs, held


@pytest.mark.timeout(120)
def test_the_free_fraction_is_read_once_and_split_between_both_generators():
    """kv_cache_free_fraction, as the trainer resolves it before the first rollout: one reading
    of the free memory (here given: 26 blocks' worth), half of it split between the student's
    and the teacher's generator by what each can use (4 requests of 32 and of 16 tokens: 17 and
    9 blocks with the dummy), so that the two never take more than the fraction together; the
    engines then hold buffers of those sizes (in whole blocks)."""
    demands, configs, held = run_workers(_sizing_worker, 1, 26, timeout=100)[0]
    assert demands == (17, 9)
    assert configs == [(pytest.approx(8.5), 0.0), (pytest.approx(4.5), 0.0)]
    assert held == [8, 4]

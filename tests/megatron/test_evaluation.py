"""avg@n evaluation through Megatron inference: the same records at TP = 1, TP = 2 and DP = 2
(data-parallel ranks split the problems and gather them back in file order), avg@n and pass@n
computed from the per-sample checks, a results file, and clear errors for bad problem files."""
import json

import pytest

from support.distributed import run_workers

pytest.importorskip("megatron.core")

from tropd_megatron.data import PromptDataConfig  # noqa: E402
from tropd_megatron.evaluation.avg_at_n import evaluate, load_problems  # noqa: E402
from tropd_megatron.megatron import ModelConfig, ParallelConfig, build_gpt, initialize  # noqa: E402
from tropd_megatron.megatron.inference import EngineConfig, Generator  # noqa: E402

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=12,
                     padded_vocab_size=12, max_sequence_length=32, init_method_std=0.5)
DIGITS = "0123456789"


def tokenize(text):  # digits 0-9 are ids 2-11; everything else is skipped
    return [2 + DIGITS.index(c) for c in text if c in DIGITS] or [2]


def decode(ids):
    return " ".join(DIGITS[i - 2] for i in ids if i >= 2)


def write_problems(path, n=7):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i} {i + 1}", "answer": str(i % 10)}) + "\n")
    return PromptDataConfig(str(path))


def _worker(rank, world, tp, path, results, samples):
    initialize(ParallelConfig(tp, 1), seed=0)
    model = build_gpt(CONFIG, ParallelConfig(tp, 1))
    generator = Generator(model, CONFIG, eos_id=1, engine=EngineConfig(max_requests=4, kv_cache_gib=0.01))
    problems = load_problems(PromptDataConfig(path), tokenize)
    result = evaluate(generator, problems, decode, samples=samples, max_new_tokens=4, results_path=results,
                      progress=False)
    return result.as_dict()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("samples", [1, 3])
def test_records_match_across_layouts_and_scores_follow_the_checks(tmp_path, samples):
    cfg = write_problems(tmp_path / "problems.jsonl")
    records = {}
    for world, tp in ((1, 1), (2, 2), (2, 1)):  # TP=1; TP=2; DP=2
        out = tmp_path / f"results_{world}_{tp}.jsonl"
        result = run_workers(_worker, world, tp, cfg.path, str(out), samples, timeout=150)[0]
        records[(world, tp)] = [json.loads(line) for line in out.read_text().splitlines()]
        rows = records[(world, tp)]
        assert [r["line"] for r in rows] == list(range(1, 8)) and all(len(r["samples"]) == samples for r in rows)
        assert result["avg_at_n"] == pytest.approx(sum(r["score"] for r in rows) / 7)
        assert result["pass_at_n"] == pytest.approx(sum(r["score"] > 0 for r in rows) / 7)
        for r in rows:
            assert r["score"] == pytest.approx(sum(s["correct"] for s in r["samples"]) / samples)
    texts = {k: [[s["text"] for s in r["samples"]] for r in v] for k, v in records.items()}
    assert texts[(2, 2)] == texts[(1, 1)]  # TP changes nothing (CPU init: the same weights)
    if samples == 1:  # greedy: DP only moves problems between ranks
        assert texts[(2, 1)] == texts[(1, 1)]


def test_problem_files_need_reference_answers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1 2", "answer": "3"}\n{"prompt": "4 5"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing reference answer field 'answer'"):
        load_problems(PromptDataConfig(str(path)), tokenize)
    with pytest.raises(ValueError, match="needs answer_field"):
        load_problems(PromptDataConfig(str(path), answer_field=None), tokenize)


def _divergence_worker(rank, world, tp, same_model):
    import torch

    from tropd_megatron.evaluation.divergence import divergence_to_teacher
    from tropd_megatron.megatron.inference import SamplingConfig
    from tropd_megatron.seeds import stream_seed

    initialize(ParallelConfig(tp, 1), seed=0)
    student = build_gpt(CONFIG, ParallelConfig(tp, 1))
    teacher = student if same_model else build_gpt(CONFIG, ParallelConfig(tp, 1))
    generator = Generator(student, CONFIG, eos_id=1, engine=EngineConfig(max_requests=4, kv_cache_gib=0.01))
    prompts = [[2 + i, 3 + i % 5, 4] for i in range(6)]
    result = divergence_to_teacher(generator, student, teacher, prompts, vocab_size=12, max_new_tokens=6, eos_id=1,
                                   seed=3, micro_batch_size=4).as_dict()
    if world == 1:  # the same samples again (one rank: its seed), scored in fp64 by plain forwards
        generations = generator.generate(prompts, SamplingConfig(max_new_tokens=6),
                                         seed=stream_seed(3, "divergence", rank=0))
        kl = teacher_nll = student_nll = tokens = 0.0
        for prompt, g in zip(prompts, generations):
            sequence = torch.tensor([prompt + g.tokens])
            inputs = sequence[:, :-1]
            S = inputs.shape[1]
            args = (inputs, torch.arange(S)[None], torch.ones(S, S, dtype=torch.bool).triu(1)[None, None])
            with torch.no_grad():
                log_s = student(*args).reshape(S, -1).double().log_softmax(-1)
                log_t = teacher(*args).reshape(S, -1).double().log_softmax(-1)
            for t in range(len(prompt) - 1, S):  # position t predicts response token t + 1
                y = sequence[0, t + 1]
                kl += float((log_s[t].exp() * (log_s[t] - log_t[t])).sum())
                teacher_nll -= float(log_t[t, y])
                student_nll -= float(log_s[t, y])
                tokens += 1
        result["reference"] = {"reverse_kl": kl / tokens, "teacher_nll": teacher_nll / tokens,
                               "student_nll": student_nll / tokens, "response_length": tokens / len(prompts),
                               "stopped_fraction": sum(g.stopped for g in generations) / len(prompts)}
    return result


@pytest.mark.timeout(200)
def test_the_held_out_divergence_matches_an_fp64_reference_on_the_same_samples():
    """Exact reverse KL, teacher and student NLL per response token (end token included), on
    samples of which some stop and some run out of budget."""
    result = run_workers(_divergence_worker, 1, 1, False, timeout=150)[0]
    reference = result.pop("reference")
    assert 0 < reference["stopped_fraction"] < 1  # both kinds of response are in the sums
    assert reference["reverse_kl"] > 0.05  # two different models
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert result["responses"] == 6


@pytest.mark.timeout(200)
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_a_student_measured_against_itself_is_at_zero_divergence_on_every_layout(tp):
    """TP = 2 (vocabulary-sharded sums) and DP = 2 (each rank its share of the prompts, summed)."""
    results = run_workers(_divergence_worker, 2, tp, True, timeout=150)
    assert results[0] == results[1]  # one answer on every rank
    assert results[0]["responses"] == 6
    assert abs(results[0]["reverse_kl"]) < 1e-6
    assert results[0]["teacher_nll"] == pytest.approx(results[0]["student_nll"], rel=1e-6)
    assert results[0]["teacher_nll"] > 1.0  # sampled at temperature 1 from a random model over 12 tokens

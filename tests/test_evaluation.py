"""avg@n evaluation through Megatron inference: the same records at TP = 1, TP = 2 and DP = 2
(data-parallel ranks split the problems and gather them back in file order), avg@n and pass@n
computed from the per-sample checks, a results file, and clear errors for bad problem files."""
import json

import pytest

from distributed import run_workers

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

"""Prompt data, rollouts with teacher-prefix guidance, micro-batch packing, and a full
iteration (rollouts -> teacher signal -> training step) at TP = 2 on CPU."""
import json

import pytest
import torch

from support.distributed import run_workers
from support.forcing import bias_token
from tropd_megatron.data import PromptDataConfig, PromptStream

pytest.importorskip("megatron.core")

from tropd_megatron.losses import TrOPDConfig  # noqa: E402
from tropd_megatron.megatron import ModelConfig, OptimConfig, ParallelConfig, build_gpt, build_student, initialize  # noqa: E402
from tropd_megatron.megatron.inference import EngineConfig, Generation, Generator, SamplingConfig  # noqa: E402
from tropd_megatron.megatron.iteration import IterationSettings, run_iteration  # noqa: E402
from tropd_megatron.megatron.rollout import Rollout, RolloutConfig, collect_rollouts, to_microbatches  # noqa: E402

EOS = 0


def tokenize(text):  # a character tokenizer over a 60-token vocabulary (0 is eos)
    return [1 + ord(c) % 59 for c in text]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_prompt_stream_shuffles_reproducibly_and_resumes(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"q": f"prompt {i}", "a": str(i)}) for i in range(7)] + [""])
    config = PromptDataConfig(path, prompt_field="q", answer_field="a", chat_template="User: {prompt}\nA:", seed=3)
    chat = lambda text: tokenize(config.chat_template.format(prompt=text))  # noqa: E731
    a, b = PromptStream(config, chat), PromptStream(config, chat)
    first = [p.index for p in a.next_batch(5)]
    assert first == [p.index for p in b.next_batch(5)]
    assert a.prompts[0].token_ids == tokenize("User: prompt 0\nA:") and a.prompts[3].answer == "3"
    state = a.state_dict()
    rest = [p.index for p in a.next_batch(9)]  # crosses into the next epoch
    assert sorted(first + rest[:2]) == list(range(7))
    c = PromptStream(config, tokenize)
    c.load_state_dict(state)
    assert [p.index for p in c.next_batch(9)] == rest
    other = PromptStream(PromptDataConfig(path, prompt_field="q", seed=4), tokenize)
    assert [p.index for p in other.next_batch(7)] != first + rest[:2]


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"prompt": "ok"}', '{"prompt": "broken"'], r"p.jsonl:2: malformed JSON"),
        (['{"prompt": "ok"}', '{"question": "x"}'], r"p.jsonl:2: missing field 'prompt'"),
        (['{"prompt": "   "}'], r"p.jsonl:1: empty prompt"),
        (['{"prompt": 5}'], r"p.jsonl:1: field 'prompt' must be a string"),
        (['{"prompt": "far too long a prompt"}'], r"p.jsonl: no usable prompts"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, lines, match):
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        PromptStream(PromptDataConfig(path, max_prompt_tokens=10), tokenize)


def test_over_length_prompts_are_reported_and_skipped(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "short"}', '{"prompt": "much much longer"}'])
    with caplog.at_level("WARNING", logger="tropd_megatron"):
        stream = PromptStream(PromptDataConfig(path, max_prompt_tokens=8), tokenize)
    assert [p.text for p in stream.prompts] == ["short"] and stream.skipped_too_long == 1
    assert "skipped 1 prompts longer than max_prompt_tokens=8 (lines [2])" in caplog.text


def test_microbatch_segments_and_masks():
    rollouts = [Rollout([5, 6, 7], [20, 21], [30, EOS], [-0.5, -0.25], True),
                Rollout([8, 9], [], [40, 41, 42], [-1.0, -2.0, -3.0], False),
                Rollout([3, 4], [50, EOS], [], [], True)]
    mbs = to_microbatches(rollouts, micro_batch_size=2, pad_id=EOS)
    assert len(mbs) == 2 and all(mb.tokens.shape == (2, 6) for mb in mbs)
    first, second = mbs
    assert first.tokens[0].tolist() == [5, 6, 7, 20, 21, 30] and first.labels[0].tolist() == [6, 7, 20, 21, 30, EOS]
    assert first.loss_mask[0].tolist() == [0, 0, 1, 1, 1, 1]  # the end token is a label, in the loss
    assert first.prefix_mask[0].tolist() == [False, False, True, True, False, False]
    assert first.rollout_logprobs[0].tolist() == [0, 0, 0, 0, -0.5, -0.25]
    assert first.tokens[1].tolist() == [8, 9, 40, 41, EOS, EOS] and first.labels[1].tolist() == [9, 40, 41, 42, EOS, EOS]
    assert first.loss_mask[1].tolist() == [0, 1, 1, 1, 0, 0] and not first.prefix_mask[1].any()
    assert second.loss_mask[0].tolist() == [0, 1, 1, 0, 0, 0] and second.prefix_mask[0].tolist()[:3] == [False, True, True]
    assert not second.loss_mask[1].any()  # a padding row
    assert to_microbatches(rollouts[1:2], 2, EOS)[0].prefix_mask is None  # no prefixes: no prefix mask


def test_prefix_schedule_decays_linearly():
    config = RolloutConfig(SamplingConfig(max_new_tokens=16), prefix_share_start=0.5, prefix_share_end=0.0,
                           prefix_tokens_start=8, prefix_tokens_end=2)
    assert config.prefix_schedule(0, 100) == (0.5, 8)
    assert config.prefix_schedule(50, 100) == (0.25, 5)
    assert config.prefix_schedule(100, 100) == (0.0, 2)
    with pytest.raises(ValueError, match="prefix_share_start=1.5"):
        RolloutConfig(prefix_share_start=1.5)


class ScriptedGenerator:
    """A Generator stand-in: continues any prompt with ``script`` (cut to the token budget)."""

    def __init__(self, eos_id, script):
        self.eos_id, self.script = eos_id, script

    def generate(self, prompts, sampling, *, seed=0, max_new_tokens=None):
        out = [self.script[:budget] for budget in (max_new_tokens or [sampling.max_new_tokens] * len(prompts))]
        return [Generation(t, [0.0] * len(t), bool(t) and t[-1] == self.eos_id) for t in out]


@pytest.mark.parametrize("teacher_script, prefix, continued", [
    ([7, 8, 5], [7, 8, 1], False),  # the teacher ended its turn: its end token (5) becomes the student's (1)
    ([7, 8, 9, 5], [7, 8, 9], True),  # cut at 3 tokens: the student continues
])
def test_teacher_prefix_end_token_is_the_students(teacher_script, prefix, continued):
    config = RolloutConfig(SamplingConfig(max_new_tokens=6), rollouts_per_prompt=1, prefix_share_start=1.0,
                           prefix_share_end=1.0, prefix_tokens_start=3, prefix_tokens_end=3)
    student, teacher = ScriptedGenerator(1, [4, 1]), ScriptedGenerator(5, teacher_script)
    (rollout,) = collect_rollouts(student, teacher, [[2, 3]], config, step=0, total_steps=1, seed=0)
    assert rollout.prefix == prefix and rollout.stopped
    assert rollout.continuation == ([4, 1] if continued else [])


STUDENT = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      vocab_size=60, padded_vocab_size=64, max_sequence_length=48)
TEACHER = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96, vocab_size=60,
                      padded_vocab_size=64, max_sequence_length=48, init_method_std=0.3)


def _iteration_worker(rank, world, path, tp, pp, sp):
    parallel = ParallelConfig(tp, pp, sequence_parallel=sp)
    initialize(parallel, seed=0)
    teacher = build_gpt(TEACHER, parallel, frozen=True)
    student = build_student(STUDENT, parallel, OptimConfig(lr=1e-2), total_steps=2)
    student_gen = Generator(student.model.module, STUDENT, eos_id=EOS, engine=EngineConfig(max_requests=8, kv_cache_gib=0.01))
    teacher_gen = Generator(teacher, TEACHER, eos_id=EOS, engine=EngineConfig(max_requests=8, kv_cache_gib=0.01))
    prompts = PromptStream(PromptDataConfig(path, max_prompt_tokens=12), tokenize)

    # teacher-prefix rollouts, greedy: the prefix is the teacher's own greedy continuation and
    # the rest is the student's greedy continuation of prompt + prefix
    greedy = RolloutConfig(SamplingConfig(top_k=1, max_new_tokens=8), rollouts_per_prompt=2, micro_batch_size=2,
                           prefix_share_start=0.5, prefix_share_end=0.5, prefix_tokens_start=3, prefix_tokens_end=3)
    batch = [p.token_ids for p in prompts.prompts[:2]]
    rollouts = collect_rollouts(student_gen, teacher_gen, batch, greedy, step=0, total_steps=2, seed=1)
    checks = []
    for r in rollouts:
        if r.prefix:
            expect_prefix = teacher_gen.generate([r.prompt], SamplingConfig(top_k=1, max_new_tokens=3))[0].tokens
            expect_rest = student_gen.generate([r.prompt + r.prefix], SamplingConfig(top_k=1, max_new_tokens=5))[0].tokens
            checks.append(r.prefix == expect_prefix and r.continuation == expect_rest)
    # the student ends its turn after a few tokens (a biased end-token row), often before the budget
    bias_token(student.model.module, EOS, 2.0)
    sampled = RolloutConfig(SamplingConfig(max_new_tokens=8), rollouts_per_prompt=4)
    ended = collect_rollouts(student_gen, teacher_gen, batch, sampled, step=0, total_steps=2, seed=2)
    ends = [(r.continuation[-1] == EOS, r.stopped, len(r.continuation_logprobs) == len(r.continuation),
             len(r.continuation)) for r in ended]
    before = [p.detach().clone() for p in student.model.module.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    sampled = RolloutConfig(SamplingConfig(max_new_tokens=8), rollouts_per_prompt=2, micro_batch_size=2,
                            prefix_share_start=0.5, prefix_share_end=0.0, prefix_tokens_start=3, prefix_tokens_end=1)
    settings = IterationSettings(sampled, TrOPDConfig(topk=8), prompts_per_step=2, vocab_size=60, total_steps=2)
    results = [run_iteration(student, teacher, student_gen, teacher_gen, prompts, settings, s) for s in range(2)]
    return dict(
        prefixed=sum(bool(r.prefix) for r in rollouts), checks=checks, ends=ends,
        metrics=[r.metrics for r in results], seconds=[r.seconds for r in results],
        student_changed=any(not torch.equal(a, b) for a, b in zip(before, student.model.module.parameters())),
        teacher_same=all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters())),
        train_mode=student.model.module.training, position=prompts.state_dict(),
    )


@pytest.mark.parametrize("tp, pp, sp", [(2, 1, False), (2, 1, True), (1, 2, False)],
                         ids=["tp2", "tp2-sequence-parallel", "pp2"])
def test_full_iteration(tmp_path, tp, pp, sp):
    """Two iterations (dynamic engine, packed micro-batches, the distributed optimizer) at
    TP = 2, TP = 2 with sequence parallelism and PP = 2."""
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": f"{a}+{b}="}) for a in range(3) for b in range(3)])
    ranks = run_workers(_iteration_worker, 2, path, tp, pp, sp, timeout=180)
    for r in ranks:
        assert r["prefixed"] == 2 and len(r["checks"]) == 2 and all(r["checks"]), r["checks"]
        assert r["student_changed"] and r["teacher_same"] and r["train_mode"]
        assert r["position"] == {"epoch": 0, "position": 4}
        for m, sec in zip(r["metrics"], r["seconds"]):
            assert m["rollouts"] == 4 and m["response_tokens"] > 0 and m["tokens_per_second"] > 0
            assert set(sec) == {"rollout", "teacher", "student", "optimizer", "total"}
        assert r["metrics"][0]["prefixed_fraction"] == 0.5
        # rollouts that stopped end with the end token and its log-prob; the rest used the budget
        assert any(stopped for _, stopped, _, _ in r["ends"]) and not all(stopped for _, stopped, _, _ in r["ends"])
        for ends_with_eos, stopped, has_logprobs, length in r["ends"]:
            assert ends_with_eos == stopped and has_logprobs and (stopped or length == 8)
        assert any(m["stopped_fraction"] > 0 for m in r["metrics"])
    last = ranks[-1]["metrics"]  # the loss metrics live on the last pipeline stage
    assert last[0]["prefix_tokens"] > 0
    for m in last:  # every generated token is a loss token, the end tokens too
        assert m["tokens"] == m["response_tokens"]
    if pp == 1:  # both TP ranks hold the same reduced metrics
        assert ranks[0]["metrics"][1]["loss"] == ranks[1]["metrics"][1]["loss"]

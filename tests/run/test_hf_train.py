"""A TrOPD run from Hugging Face folders and back: a tiny Llama teacher with padded embedding
rows and its own end-of-turn token, a tiny Qwen2 student without padding, a Hugging Face
tokenizer with a chat template; two steps at TP = 2 with teacher prefixes, then the trained
student exported at TP = 1 and loaded by transformers. The run is a recipe of the user's own
(a Python file whose function builds both model configs from the folders, as the README shows),
which launch.train, launch.export and launch.evaluate all take."""
import json
import os
import subprocess
import sys

import pytest
import torch

from support.distributed import free_port
from support.hf_models import hf_model, hf_tokenizer
from support.tiny_files import make_tiny_files
from support import REPO

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")
ROOT = REPO
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# What a user writes for models the project does not ship (README: "Your own recipe").
USER_RECIPE = """
from dataclasses import replace

from recipes.models import from_hf
from recipes.tiny import tiny
from tropd_megatron.run_config import ModelSpec


def distill_my_llama():
    root = "{root}"
    run = tiny(root)  # the tiny task's data, schedule and objective; the models are ours
    return replace(
        run, name="distill_my_llama", tokenizer=f"{{root}}/student_tokenizer",
        teacher_tokenizer=f"{{root}}/teacher_tokenizer",
        teacher=ModelSpec(from_hf(f"{{root}}/teacher", vocab_size={vocab}), checkpoint=f"{{root}}/teacher"),
        student=ModelSpec(from_hf(f"{{root}}/student"), checkpoint=f"{{root}}/student"),
        data=replace(run.data, chat_template="tokenizer"),
        rollout=replace(run.rollout, prefix_share_start=0.5, prefix_share_end=0.5, prefix_tokens_start=4,
                        prefix_tokens_end=4),
    )
"""


@pytest.mark.timeout(420)
def test_tropd_from_hugging_face_folders_then_export(tmp_path):
    import transformers
    from safetensors.torch import load_file

    files = make_tiny_files(tmp_path)
    texts = [f"Q: {r['prompt']} A: {r['answer']}" for r in map(json.loads, open(tmp_path / "prompts.jsonl"))]
    tokenizer = hf_tokenizer(tmp_path / "student_tokenizer", texts)  # ends turns with <|im_end|>
    hf_tokenizer(tmp_path / "teacher_tokenizer", texts, eos_token="<|endoftext|>")  # same vocabulary
    vocab = len(tokenizer)
    hf_model("llama", tmp_path / "teacher", rows=vocab + 6, hidden_size=48, seed=1)  # padded rows
    hf_model("qwen2", tmp_path / "student", rows=vocab, seed=2)
    (tmp_path / "student" / "generation_config.json").write_text('{"eos_token_id": 1}')
    for file in (tmp_path / "student_tokenizer").iterdir():  # the student's folder carries its tokenizer
        (tmp_path / "student" / file.name).write_bytes(file.read_bytes())
    recipe = tmp_path / "my_recipes.py"
    recipe.write_text(USER_RECIPE.format(root=tmp_path, vocab=vocab))
    spec = f"{recipe}:distill_my_llama"
    # the short-run settings of the other tiny tests, not their random models and tokenizer
    overrides = [o for o in files if not o.startswith(("tokenizer=", "teacher.", "student."))] + ["schedule.steps=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "launch.train", "--recipe", spec, *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"vocabulary: {vocab} tokens; both models get {vocab + 6} embedding rows" in out.stderr
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and not r["skipped_update"] for r in records)
    assert any(r["prefixed_fraction"] > 0 for r in records)

    env = {**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    exported = tmp_path / "student_trained"
    ex = subprocess.run([sys.executable, "-m", "launch.export", "--recipe", spec, "--out", str(exported),
                         *overrides, "parallel.tensor=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert "run/step_00000002 -> " in ex.stdout
    config = json.loads((exported / "config.json").read_text())
    assert config["vocab_size"] == vocab and config["model_type"] == "qwen2"  # the student's own rows, not 6 more
    assert (exported / "generation_config.json").read_text() == '{"eos_token_id": 1}'
    before, after = load_file(tmp_path / "student" / "model.safetensors"), load_file(exported / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    reloaded = transformers.AutoTokenizer.from_pretrained(exported)
    ids = reloaded.apply_chat_template([{"role": "user", "content": "(7+5)*5"}], add_generation_prompt=True,
                                       return_dict=False)
    assert reloaded.eos_token == "<|im_end|>"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits).all()

    # the exported folder is a student checkpoint in its own right: avg@n straight from it
    env["MASTER_PORT"] = str(free_port())
    ev = subprocess.run([sys.executable, "-m", "launch.evaluate", "--recipe", spec, "--problems",
                         str(tmp_path / "held_out.jsonl"), "--weights", str(exported), *overrides, "parallel.tensor=1"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads(ev.stdout.strip().splitlines()[-1])
    assert summary["weights"] == str(exported) and summary["problems"] == 8

"""Depth pruning of a Hugging Face folder (tropd_megatron.pruning, launch.prune), on tiny
Llamas made here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.hf_models import hf_logits, hf_model, hf_tokenizer
from tropd_megatron import ConfigError
from tropd_megatron.pruning import layers_to_keep, prune_hf_layers, renamed
from support import REPO

pytestmark = pytest.mark.timeout(120)
ROOT = Path(REPO)


def _parent(folder, layers=5, **overrides):
    model = hf_model("llama", folder, num_hidden_layers=layers, **overrides)
    hf_tokenizer(folder, ["1+2=3", "4*5=20"])
    return model


def _load(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_keeping_every_layer_gives_the_parents_logits_exactly(tmp_path):
    parent = _parent(tmp_path / "parent")
    out = prune_hf_layers(tmp_path / "parent", tmp_path / "all", list(range(5)))
    tokens = torch.randint(0, 60, (2, 17), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(_load(out), tokens), hf_logits(parent, tokens))


def test_a_pruned_model_is_the_parent_with_only_the_kept_layers(tmp_path):
    """Its logits equal the parent's forward through layers 0, 2, 4 alone, and they are not the
    parent's (a prune that kept or renumbered the wrong layers fails one of the two)."""
    parent = _parent(tmp_path / "parent")
    out = prune_hf_layers(tmp_path / "parent", tmp_path / "student", [4, 0, 2])  # any order: kept in layer order
    student = _load(out)
    assert student.config.num_hidden_layers == 3
    for new, old in enumerate([0, 2, 4]):
        for (name, p), (_, q) in zip(student.model.layers[new].named_parameters(),
                                     parent.model.layers[old].named_parameters()):
            assert torch.equal(p, q), (new, old, name)
    tokens = torch.randint(0, 60, (2, 17), generator=torch.Generator().manual_seed(1))
    full = hf_logits(parent, tokens)
    parent.model.layers = torch.nn.ModuleList([parent.model.layers[i] for i in (0, 2, 4)])
    with torch.no_grad():  # no KV cache: the kept layers keep their old layer numbers here
        reference = parent(input_ids=tokens, use_cache=False).logits
    assert torch.equal(hf_logits(student, tokens), reference)
    assert not torch.allclose(reference, full, atol=1e-2)
    assert json.loads((out / "pruning.json").read_text())["kept_layers"] == [0, 2, 4]
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the chat template travels with the tokenizer
        assert (out / name).read_bytes() == (tmp_path / "parent" / name).read_bytes()


def test_a_sharded_parent_gives_a_sharded_student_with_a_consistent_index(tmp_path):
    parent = _parent(tmp_path / "parent")
    folder = tmp_path / "sharded"
    parent.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    out = prune_hf_layers(folder, tmp_path / "student", [1, 3])
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors import safe_open

    on_disk = {}
    for file in set(index.values()):
        with safe_open(str(out / file), framework="pt") as f:
            on_disk.update(dict.fromkeys(f.keys(), file))
    assert on_disk == index
    assert not any(".layers.2." in name or ".layers.3." in name for name in index)
    tokens = torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(2))
    flat = prune_hf_layers(tmp_path / "parent", tmp_path / "flat", [1, 3])
    assert torch.equal(hf_logits(_load(out), tokens), hf_logits(_load(flat), tokens))


def test_layer_choices_and_their_errors():
    assert layers_to_keep(30, every=3) == list(range(0, 30, 3))
    assert layers_to_keep(10, first=2, last=3) == [0, 1, 7, 8, 9]
    assert layers_to_keep(10, keep=[9, 0]) == [0, 9]
    for kwargs, message in [({}, "one way"), ({"keep": [1], "every": 2}, "one way"), ({"keep": [10]}, "out of range"),
                            ({"keep": [1, 1]}, "twice"), ({"keep": []}, "no layer"), ({"every": 0}, "at least 1"),
                            ({"first": 6, "last": 5}, "sum")]:
        with pytest.raises(ConfigError, match=message):
            layers_to_keep(10, **kwargs)
    assert renamed("model.layers.12.mlp.up_proj.weight", {12: 3}) == "model.layers.3.mlp.up_proj.weight"
    assert renamed("model.layers.1.mlp.up_proj.weight", {12: 3}) is None
    assert renamed("model.norm.weight", {}) == "model.norm.weight"


def test_an_existing_output_folder_is_refused_and_left_alone(tmp_path):
    _parent(tmp_path / "parent", layers=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists"):
        prune_hf_layers(tmp_path / "parent", tmp_path / "out", [0])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_the_command_line_prunes_and_names_a_bad_choice(tmp_path):
    _parent(tmp_path / "parent", layers=4)
    run = lambda *a: subprocess.run([sys.executable, "-m", "launch.prune", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=100)
    done = run(str(tmp_path / "parent"), str(tmp_path / "out"), "--every", "2")
    assert done.returncode == 0, done.stderr
    assert "kept 2 layers [0, 2]" in done.stdout
    bad = run(str(tmp_path / "parent"), str(tmp_path / "out2"), "--keep", "0,7")
    assert bad.returncode == 2 and "out of range" in bad.stderr and not (tmp_path / "out2").exists()

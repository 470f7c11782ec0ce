"""Depth pruning of a Hugging Face decoder: a student made of some of its parent's layers.

    keep = layers_to_keep(30, every=3)                 # 0, 3, ..., 27
    prune_hf_layers("SmolLM2-135M", "student", keep)   # an HF folder that transformers loads

Minitron's first step (NVIDIA's Llama-3.1-Minitron 4B from 8B): drop whole decoder layers,
then recover the student by distilling from its parent. Only safetensors and JSON are read
and written (no torch model is built), one source shard at a time, so a 70B parent never
sits whole in memory. The folder's other files (tokenizer, chat template, generation config)
are copied as they are; ``pruning.json`` records the source and the kept layers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from . import ConfigError

LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")
WEIGHTS_INDEX = "model.safetensors.index.json"
RECORD = "pruning.json"


def layers_to_keep(num_layers: int, *, keep: list[int] | None = None, every: int | None = None,
                   first: int = 0, last: int = 0) -> list[int]:
    """The sorted decoder layers a student keeps, out of ``num_layers``: the ones listed in
    ``keep``, or every ``every``-th from layer 0, or the ``first`` and ``last`` ones (exactly
    one way). Refuses an empty, out-of-range or duplicated choice."""
    ways = [keep is not None, every is not None, bool(first or last)]
    if sum(ways) != 1:
        raise ConfigError("choose the kept layers one way: a list (--keep), every n-th (--every), or first / last k")
    if keep is not None:
        chosen = list(keep)
    elif every is not None:
        if every < 1:
            raise ConfigError(f"--every {every}: must be at least 1")
        chosen = list(range(0, num_layers, every))
    else:
        if first < 0 or last < 0 or first + last > num_layers:
            raise ConfigError(f"first {first} + last {last} layers: need 0 <= each and a sum <= {num_layers}")
        chosen = list(range(first)) + list(range(num_layers - last, num_layers))
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"layers {bad} are out of range: the model has layers 0..{num_layers - 1}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"layers {chosen}: a layer is listed twice")
    if not chosen:
        raise ConfigError("no layer kept")
    return sorted(chosen)


def _weight_files(folder: Path) -> list[str]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (a Hugging Face model folder)")
    return files


def renamed(name: str, new_index: dict[int, int]) -> str | None:
    """``name`` in the pruned model: a kept layer's tensors renumbered, a dropped layer's None,
    every other tensor (embedding, final norm, output layer) as it is."""
    match = LAYER.match(name)
    if match is None:
        return name
    layer = new_index.get(int(match.group(2)))
    return None if layer is None else f"{match.group(1)}{layer}{match.group(3)}"


def prune_hf_layers(source, out, keep: list[int]) -> Path:
    """Write to ``out`` the model of HF folder ``source`` with only decoder layers ``keep``
    (renumbered from 0 in their order); returns ``out``. Written to a temporary folder and
    renamed, so ``out`` is either absent or whole."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file (a Hugging Face model folder has config.json)")
    config = json.loads(config_file.read_text())
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise ConfigError(f"{config_file}: no integer num_hidden_layers")
    keep = layers_to_keep(num_layers, keep=keep)
    new_index = {old: new for new, old in enumerate(keep)}
    if out.exists():
        raise ConfigError(f"{out} exists: delete it or choose another folder")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files = _weight_files(source)
    weight_map = {}
    for file in files:
        tensors = {}
        with safe_open(str(source / file), framework="pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                new = renamed(name, new_index)
                if new is not None:
                    tensors[new] = f.get_tensor(name)
        save_file(tensors, str(partial / file), metadata=metadata)
        weight_map.update(dict.fromkeys(tensors, file))
    if (source / WEIGHTS_INDEX).is_file():
        total = sum(os.path.getsize(partial / f) for f in files)
        (partial / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config["num_hidden_layers"] = len(keep)
    for key in ("layer_types",):  # per-layer lists (sliding / full attention) follow the kept layers
        if isinstance(config.get(key), list) and len(config[key]) == num_layers:
            config[key] = [config[key][i] for i in keep]
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in source.iterdir():  # tokenizer, chat template, generation config
        if item.is_file() and item.name not in {*files, WEIGHTS_INDEX, "config.json", RECORD}:
            shutil.copy2(item, partial / item.name)
    (partial / RECORD).write_text(json.dumps({"source": str(source.resolve()), "source_layers": num_layers,
                                              "kept_layers": keep}, indent=2) + "\n")
    os.replace(partial, out)
    return out

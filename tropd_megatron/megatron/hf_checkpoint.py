"""Hugging Face checkpoints in and out (config.json + safetensors): Llama 3, Qwen2 / 2.5, Qwen3.

    model_config_from_hf(folder)          the ModelConfig of a Hugging Face model folder
    load_hf_weights(gpt, config, folder)  this rank's TP / PP shards, read straight from safetensors
    export_hf(gpt, config, out, source)   a folder that ``transformers`` loads (collective)

One table (``_layer_params``) maps each Megatron parameter to its Hugging Face tensors and to
how tensor parallelism splits it; loading and exporting both read it. Each rank reads only its
own slices (``safe_open(...).get_slice``), so a 70B teacher never sits whole in one process.
Embedding rows are matched by token id: rows past the tokenizer's vocabulary (padding, masked
to -inf by ``build_gpt``) are copied where both sides have them and zero otherwise, so a
152064-row checkpoint loads into a 151936-row model and back.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from ..config.model import ModelConfig
from .groups import ModelGroups
from .. import ConfigError

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# Megatron's Llama 3.1 RoPE scaling has these fixed; other values are refused, not approximated
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def is_hf_folder(path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and any(path.glob("*.safetensors"))


def read_hf_config(folder) -> dict:
    file = Path(folder) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (a Hugging Face model folder has config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}:{e.lineno}: malformed JSON ({e.msg})") from None


def hf_family(config: ModelConfig) -> str:
    """The Hugging Face family a ModelConfig exports as: the three differ exactly in these flags."""
    return "qwen3" if config.qk_layernorm else "qwen2" if config.add_qkv_bias else "llama"


def _rope(hf: dict, file: Path) -> tuple[float, float | None]:
    """(rope theta, Llama 3.1 scaling factor or None), from old (rope_theta / rope_scaling) or
    new (rope_parameters) config.json keys."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or ({k: v for k, v in params.items() if k != "rope_theta"} or None)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "llama3" and all(float(scaling.get(k, -1)) == v for k, v in LLAMA3_ROPE.items()):
        return float(theta), float(scaling["factor"])
    raise ConfigError(f"{file}: rope scaling {scaling} is not supported (only none, or Llama 3.1's "
                     f"'llama3' type with {LLAMA3_ROPE})")


def model_config_from_hf(folder, *, vocab_size: int | None = None, max_sequence_length: int | None = None,
                         dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder. ``vocab_size``: the tokenizer's true size
    (default: config.json's, i.e. every embedding row); the config's rows become
    ``padded_vocab_size``. An unsupported family or feature is a ValueError naming the file."""
    file = Path(folder) / CONFIG
    hf = read_hf_config(folder)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"{file}: model_type {family!r} is not supported; supported families: "
                         f"{', '.join(FAMILIES)} (Llama 3, Qwen2 / 2.5, Qwen3)")
    if missing:
        raise ConfigError(f"{file}: missing {', '.join(missing)}")
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "attention_bias": family != "qwen2" and bool(hf.get("attention_bias", False)),
        "use_sliding_window": bool(hf.get("use_sliding_window", False)),
    }
    bad = [f"{k}={hf.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"{file}: {', '.join(bad)} is not supported for {family}")
    theta, scaling = _rope(hf, file)
    rows = int(hf["vocab_size"])
    vocab = vocab_size or rows
    if vocab > rows:
        raise ConfigError(f"{file}: vocab_size={rows} embedding rows, fewer than the tokenizer's {vocab} tokens")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    torch_dtype = hf.get("dtype", hf.get("torch_dtype"))
    return ModelConfig(
        num_layers=int(hf["num_hidden_layers"]), hidden_size=int(hf["hidden_size"]), num_attention_heads=heads,
        ffn_hidden_size=int(hf["intermediate_size"]), vocab_size=vocab,
        padded_vocab_size=rows if rows != vocab else None,
        max_sequence_length=max_sequence_length or int(hf.get("max_position_embeddings", 4096)),
        num_query_groups=int(hf.get("num_key_value_heads", heads)),
        kv_channels=None if head_dim * heads == hf["hidden_size"] else int(head_dim),
        rotary_base=theta, rope_scaling_factor=scaling, norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        untie_embeddings=not hf.get("tie_word_embeddings", False), qk_layernorm=family == "qwen3",
        add_qkv_bias=family == "qwen2",
        dtype=dtype or {v: k for k, v in DTYPE_NAMES.items()}.get(torch_dtype, "fp32"),
    )


# settings that describe the run rather than the weights; kv_channels is compared as head_dim
_NOT_COMPARED = {"vocab_size", "padded_vocab_size", "max_sequence_length", "init_method_std", "dtype", "recompute",
                 "kv_channels"}


def check_matches(config: ModelConfig, folder, what: str) -> None:
    """``config`` (``what``.model) must have the shape of the weights in ``folder``; the
    ValueError lists each difference and the overrides that take the checkpoint's shape."""
    found = model_config_from_hf(folder, vocab_size=config.vocab_size)
    names = [f.name for f in fields(ModelConfig)
             if f.name not in _NOT_COMPARED and not _same(getattr(config, f.name), getattr(found, f.name))]
    wrong = [f"{what}.model.{n}={getattr(config, n)!r} but the checkpoint has {getattr(found, n)!r}" for n in names]
    fix = [f"{what}.model.{n}={_override(getattr(found, n))}" for n in names]
    if config.head_dim != found.head_dim:  # kv_channels None means hidden_size / heads: say the sizes
        wrong.append(f"{what}.model.kv_channels={config.kv_channels!r} gives heads of {config.head_dim} but the "
                     f"checkpoint's are {found.head_dim}")
        fix.append(f"{what}.model.kv_channels={found.head_dim}")
    if wrong:
        fix = " ".join(fix)
        raise ConfigError(f"{what}.checkpoint={folder} ({Path(folder) / CONFIG}) does not match the configured "
                         "model:\n  " + "\n  ".join(wrong) + f"\nto take the checkpoint's shape, add: {fix}")


def _same(configured, stored) -> bool:
    """Equal, floats within a relative 1e-6: config.json files store 1e-5 as float32 (9.999999747e-06)."""
    if isinstance(configured, float) and isinstance(stored, float):
        return math.isclose(configured, stored, rel_tol=1e-6)
    return configured == stored


def _override(value) -> str:
    """``value`` as a command-line override writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def hf_config(config: ModelConfig, vocab_rows: int) -> dict:
    """config.json for ``config`` (when there is no source folder to start from)."""
    family = hf_family(config)
    hf = {
        "architectures": [FAMILIES[family]], "model_type": family, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups or config.num_attention_heads, "head_dim": config.head_dim,
        "vocab_size": vocab_rows, "max_position_embeddings": config.max_sequence_length,
        "rms_norm_eps": config.norm_epsilon, "rope_theta": config.rotary_base, "hidden_act": "silu",
        "tie_word_embeddings": not config.untie_embeddings, "torch_dtype": DTYPE_NAMES[config.dtype],
    }
    if family != "qwen2":
        hf["attention_bias"] = False
    if config.rope_scaling_factor:
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": config.rope_scaling_factor, **LLAMA3_ROPE}
    return hf


# ---------------------------------------------------------------------------------------------
# the mapping


@dataclass(frozen=True)
class _Param:
    """One Megatron parameter: its Hugging Face tensors and how tensor parallelism splits it.

    split: "vocab" (rows, padded to the model's), "row" (columns), "replicated",
    "qkv" (q, k, v interleaved per query group), "gate_up" (gate and up, each split by rows).
    """

    hf: tuple
    split: str


def _layer_params(config: ModelConfig, layer: int) -> dict:
    """Megatron name (after ``decoder.layers.N.``) -> _Param, for Hugging Face layer ``layer``.
    The layer norms have a local-spec and a TransformerEngine (fused into the next linear) name."""
    p = f"model.layers.{layer}."
    table = {
        "input_layernorm.weight": _Param((p + "input_layernorm.weight",), "replicated"),
        "self_attention.linear_qkv.layer_norm_weight": _Param((p + "input_layernorm.weight",), "replicated"),
        "self_attention.linear_qkv.weight": _Param(tuple(f"{p}self_attn.{x}_proj.weight" for x in "qkv"), "qkv"),
        "self_attention.linear_proj.weight": _Param((p + "self_attn.o_proj.weight",), "row"),
        "pre_mlp_layernorm.weight": _Param((p + "post_attention_layernorm.weight",), "replicated"),
        "mlp.linear_fc1.layer_norm_weight": _Param((p + "post_attention_layernorm.weight",), "replicated"),
        "mlp.linear_fc1.weight": _Param((p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "gate_up"),
        "mlp.linear_fc2.weight": _Param((p + "mlp.down_proj.weight",), "row"),
    }
    if config.add_qkv_bias:
        table["self_attention.linear_qkv.bias"] = _Param(tuple(f"{p}self_attn.{x}_proj.bias" for x in "qkv"), "qkv")
    if config.qk_layernorm:
        table["self_attention.q_layernorm.weight"] = _Param((p + "self_attn.q_norm.weight",), "replicated")
        table["self_attention.k_layernorm.weight"] = _Param((p + "self_attn.k_norm.weight",), "replicated")
    return table


def _mapping(gpt, config: ModelConfig) -> dict:
    """{Megatron parameter name: _Param} for this rank's pipeline stage."""
    embedding = "model.embed_tokens.weight"
    table = {
        "embedding.word_embeddings.weight": _Param((embedding,), "vocab"),
        "decoder.final_layernorm.weight": _Param(("model.norm.weight",), "replicated"),
        # a tied output layer (Qwen3 <= 4B) is the embedding; with PP it is a copy on the last stage
        "output_layer.weight": _Param(("lm_head.weight" if config.untie_embeddings else embedding,), "vocab"),
    }
    groups = ModelGroups.of(gpt)  # the model's own layout (a teacher's may differ from the global one)
    per_stage = config.num_layers // groups.pipeline
    offset = groups.pp_rank * per_stage
    mapping = {}
    for name, _ in gpt.named_parameters():
        if name.startswith("decoder.layers."):
            local, rest = name[len("decoder.layers."):].split(".", 1)
            entry = _layer_params(config, offset + int(local)).get(rest)
        else:
            entry = table.get(name)
        if entry is None:
            raise ConfigError(f"no Hugging Face counterpart for Megatron parameter {name!r}")
        mapping[name] = entry
    return mapping


def _qkv_sizes(config: ModelConfig, tp: int) -> tuple[int, int, int]:
    """(query groups on one TP rank, query rows per group, key/value rows per group)."""
    groups = config.num_query_groups or config.num_attention_heads
    return groups // tp, config.num_attention_heads // groups * config.head_dim, config.head_dim


# ---------------------------------------------------------------------------------------------
# import


class _SafetensorsFolder:
    """Tensors of a Hugging Face folder by name, read lazily and by slice."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {}
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    weight_map.update({k: file.name for k in f.keys()})
        if not weight_map:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors weights")
        self.weight_map = weight_map
        self._open = {}
        self._safe_open = safe_open

    def slice(self, name: str):
        if name not in self.weight_map:
            raise ConfigError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = self._safe_open(self.folder / file, framework="pt")
        return self._open[file].get_slice(name)


def _read_shard(reader: _SafetensorsFolder, entry: _Param, config: ModelConfig, shape, tp: int, rank: int):
    """This rank's shard of one parameter, read from the checkpoint (``shape``: the parameter's)."""
    if entry.split == "replicated":
        return reader.slice(entry.hf[0])[:]
    if entry.split == "vocab":
        source = reader.slice(entry.hf[0])
        rows = source.get_shape()[0]
        lo, hi = rank * shape[0], (rank + 1) * shape[0]
        shard = torch.zeros(shape, dtype=_dtype(source))
        if lo < rows:
            shard[: min(hi, rows) - lo] = source[lo : min(hi, rows)]
        return shard
    if entry.split == "row":
        return reader.slice(entry.hf[0])[:, rank * shape[1] : (rank + 1) * shape[1]]
    if entry.split == "gate_up":
        half = shape[0] // 2
        return torch.cat([reader.slice(n)[rank * half : (rank + 1) * half] for n in entry.hf])
    if entry.split == "qkv":
        groups, q_rows, kv_rows = _qkv_sizes(config, tp)
        q, k, v = (reader.slice(n)[rank * groups * r : (rank + 1) * groups * r]
                   for n, r in zip(entry.hf, (q_rows, kv_rows, kv_rows)))
        tail = q.shape[1:]
        return torch.cat([q.reshape(groups, q_rows, *tail), k.reshape(groups, kv_rows, *tail),
                          v.reshape(groups, kv_rows, *tail)], dim=1).reshape(-1, *tail)
    raise AssertionError(entry.split)


def _dtype(source) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[source.get_dtype()]


@torch.no_grad()
def load_hf_weights(gpt, config: ModelConfig, folder, what: str = "model") -> None:
    """Copy a Hugging Face checkpoint into ``gpt`` (this rank's stage and TP shard).

    ``config`` is the model's configuration (its embedding rows may differ from the folder's);
    a shape mismatch with ``folder`` is a ValueError naming the key. Call
    ``optimizer.reload_model_params()`` afterwards when ``gpt`` already has an optimizer.
    """
    check_matches(config, folder, what)
    reader = _SafetensorsFolder(folder)
    groups = ModelGroups.of(gpt)
    tp, rank = groups.tensor, groups.tp_rank
    mapping = _mapping(gpt, config)
    for name, param in gpt.named_parameters():
        entry = mapping[name]
        shard = _read_shard(reader, entry, config, param.shape, tp, rank)
        if shard.shape != param.shape:
            raise ConfigError(f"{folder}: {'+'.join(entry.hf)} gives a {tuple(shard.shape)} shard for {name} "
                             f"{tuple(param.shape)} at tensor parallel size {tp}")
        param.copy_(shard)


# ---------------------------------------------------------------------------------------------
# export


def _full_tensors(shards: list, entry: _Param, config: ModelConfig, vocab_rows: int) -> dict:
    """{Hugging Face name: tensor} from one parameter's TP shards (in rank order)."""
    tp = len(shards)
    if entry.split == "replicated":
        return {entry.hf[0]: shards[0]}
    if entry.split == "vocab":
        full = torch.cat(shards)
        out = torch.zeros((vocab_rows, *full.shape[1:]), dtype=full.dtype)
        out[: min(vocab_rows, len(full))] = full[:vocab_rows]
        return {entry.hf[0]: out}
    if entry.split == "row":
        return {entry.hf[0]: torch.cat(shards, dim=1)}
    if entry.split == "gate_up":
        halves = [s.chunk(2) for s in shards]
        return {name: torch.cat([h[i] for h in halves]) for i, name in enumerate(entry.hf)}
    if entry.split == "qkv":
        groups, q_rows, kv_rows = _qkv_sizes(config, tp)
        parts = [s.reshape(groups, q_rows + 2 * kv_rows, *s.shape[1:]).split([q_rows, kv_rows, kv_rows], dim=1)
                 for s in shards]
        return {name: torch.cat([p[i].reshape(-1, *p[i].shape[2:]) for p in parts])
                for i, name in enumerate(entry.hf)}
    raise AssertionError(entry.split)


@torch.no_grad()
def export_hf(gpt, config: ModelConfig, out, source=None, tokenizer=None) -> Path:
    """Write ``gpt`` as a Hugging Face folder at ``out``; collective over every rank.

    ``source``: the Hugging Face folder the model came from; its config.json (with the
    settings this code does not model), generation config and tokenizer files are kept, and
    its embedding row count is written back. Without it config.json is built from ``config``
    and the tokenizer files are copied from the ``tokenizer`` folder when one is given.
    One safetensors file per pipeline stage, written by that stage's first TP / DP rank, into
    a temporary folder renamed to ``out`` when complete: an interrupted export leaves no
    half-written ``out``.
    """
    out = Path(out)
    partial = out.with_name(f".incomplete_{out.name}")
    hf = read_hf_config(source) if source else None
    vocab_rows = int(hf["vocab_size"]) if hf else config.embedding_rows
    if dist.get_rank() == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    groups = ModelGroups.of(gpt)
    tp_group, tp = groups.pgs.tp, groups.tensor
    tensors = {}
    mapping = _mapping(gpt, config)
    for name, param in gpt.named_parameters():
        entry = mapping[name]
        if name == "output_layer.weight" and not config.untie_embeddings:
            continue  # tied: the embedding is written once, by the first stage
        shards = [torch.empty_like(param) for _ in range(tp)]
        dist.all_gather(shards, param.detach().contiguous(), group=tp_group)
        tensors.update({k: v.cpu() for k, v in _full_tensors(shards, entry, config, vocab_rows).items()})
    stages, stage = groups.pipeline, groups.pp_rank
    file = "model.safetensors" if stages == 1 else f"model-{stage + 1:05d}-of-{stages:05d}.safetensors"
    writer = groups.tp_rank == 0 and groups.dp_rank == 0
    if writer:
        from safetensors.torch import save_file

        save_file(tensors, partial / file, metadata={"format": "pt"})
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, (file, sorted(tensors)) if writer else None)
    if dist.get_rank() == 0:
        _write_metadata(partial, config, hf, vocab_rows, source, tokenizer, [n for n in names if n is not None])
        if out.exists():
            shutil.rmtree(out)
        os.rename(partial, out)
    dist.barrier()
    return out


TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges", "added_tokens")


def _write_metadata(folder: Path, config: ModelConfig, hf: dict | None, vocab_rows: int, source, tokenizer,
                    files) -> None:
    if len(files) > 1:
        weight_map = {name: file for file, names in files for name in names}
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                               indent=2))
    if source:
        for item in Path(source).iterdir():  # tokenizer, generation config, chat template, ...
            if item.is_file() and item.suffix != ".safetensors" and item.name not in (INDEX, CONFIG):
                shutil.copy2(item, folder / item.name)
    elif tokenizer and Path(tokenizer).is_dir():
        for item in Path(tokenizer).iterdir():
            if item.is_file() and item.name.startswith(TOKENIZER_FILES):
                shutil.copy2(item, folder / item.name)
    config_json = dict(hf or hf_config(config, vocab_rows))
    config_json["torch_dtype"] = DTYPE_NAMES[config.dtype]
    config_json.pop("dtype", None)
    (folder / CONFIG).write_text(json.dumps(config_json, indent=2))

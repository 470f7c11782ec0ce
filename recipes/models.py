"""Published model shapes (from each model's config.json) as ModelConfigs, and ``from_hf``
for any supported Hugging Face folder on hand."""
from dataclasses import replace

from tropd_megatron.config.model import ModelConfig


def from_hf(folder: str, *, vocab_size: int | None = None, **settings) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder (Llama 3, Qwen2 / 2.5, Qwen3), for a recipe
    written against checkpoints on disk. ``vocab_size``: the tokenizer's size when the
    embedding has padding rows; ``settings``: e.g. dtype="bf16", recompute="selective"."""
    from tropd_megatron.megatron.hf_checkpoint import model_config_from_hf  # megatron-core: only for HF recipes

    return replace(model_config_from_hf(folder, vocab_size=vocab_size), **settings)

LLAMA3_VOCAB = 128256
QWEN3_VOCAB = 151936  # Qwen3's embedding rows
QWEN3_TOKENS = 151669  # its tokenizer's tokens: rows past these are padding (masked)


# Llama 3.1 / 3.3 shapes (RoPE scaling factor 8); for a Llama 3.0 checkpoint set
# rope_scaling_factor=None (the checkpoint check names the difference).
def llama3_70b(max_sequence_length: int = 8192) -> ModelConfig:
    return ModelConfig(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                       ffn_hidden_size=28672, vocab_size=LLAMA3_VOCAB, max_sequence_length=max_sequence_length,
                       rotary_base=500000, rope_scaling_factor=8.0, dtype="bf16")


def llama3_8b(max_sequence_length: int = 8192) -> ModelConfig:
    return ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                       ffn_hidden_size=14336, vocab_size=LLAMA3_VOCAB, max_sequence_length=max_sequence_length,
                       rotary_base=500000, rope_scaling_factor=8.0, dtype="bf16")


def qwen3_8b(max_sequence_length: int = 10240) -> ModelConfig:
    return ModelConfig(num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                       ffn_hidden_size=12288, vocab_size=QWEN3_TOKENS, padded_vocab_size=QWEN3_VOCAB,
                       max_sequence_length=max_sequence_length, norm_epsilon=1e-6,
                       kv_channels=128, qk_layernorm=True, rotary_base=1000000, dtype="bf16")


def qwen3_1p7b(max_sequence_length: int = 10240) -> ModelConfig:
    return ModelConfig(num_layers=28, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                       ffn_hidden_size=6144, vocab_size=QWEN3_TOKENS, padded_vocab_size=QWEN3_VOCAB,
                       max_sequence_length=max_sequence_length, norm_epsilon=1e-6,
                       kv_channels=128, qk_layernorm=True, rotary_base=1000000, untie_embeddings=False, dtype="bf16")


SMOLLM2_VOCAB = 49152


def smollm2_135m(max_sequence_length: int = 8192) -> ModelConfig:
    """SmolLM2-135M(-Instruct): Llama, 30 layers, 9 heads / 3 KV groups, tied embeddings."""
    return ModelConfig(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536,
                       vocab_size=SMOLLM2_VOCAB, max_sequence_length=max_sequence_length, rotary_base=100000,
                       norm_epsilon=1e-5, untie_embeddings=False)

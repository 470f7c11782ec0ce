"""Tiny, randomly initialised Hugging Face models and tokenizers made locally (no downloads)."""
import torch

VOCAB = 60  # the tokenizer's true size; models may have more embedding rows


def hf_model(family: str, folder, *, rows: int = VOCAB, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny ``family`` model (llama / qwen2 / qwen3) saved to ``folder``; returns the model."""
    import transformers

    shape = dict(vocab_size=rows, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                 initializer_range=0.2)  # logits of order 1, so that a wrong detail shows
    family_settings = {
        "llama": dict(rope_theta=20000.0,  # low enough that the scaling changes logits at 48 positions
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}),
        "qwen2": dict(rope_theta=1000000.0, tie_word_embeddings=True),
        "qwen3": dict(rope_theta=1000000.0, head_dim=16, tie_word_embeddings=True),  # head_dim != hidden / heads
    }
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    config = config_class(**{**shape, **family_settings[family], **overrides})
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():  # transformers zero-initialises biases and ones the norms: make every weight count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


CHAT_TEMPLATE = ("{% for m in messages %}Q: {{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %} A:{% endif %}")


def hf_tokenizer(folder, texts, *, eos_token: str = "<|im_end|>", vocab_size: int = 48):
    """A byte-level BPE trained on ``texts`` with a chat template, saved as tokenizer.json +
    tokenizer_config.json; the same ``texts`` give the same vocabulary whatever ``eos_token``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<|im_end|>", "<|endoftext|>"]
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(folder)
    return fast


def model_overrides(what: str, folder, vocab_size: int) -> list:
    """The overrides that give ``what`` (teacher / student) the shape of the folder's model."""
    from dataclasses import asdict

    from recipes.models import from_hf

    shape = asdict(from_hf(str(folder), vocab_size=vocab_size))
    return [f"{what}.model.{k}={'null' if v is None else v}" for k, v in shape.items()]

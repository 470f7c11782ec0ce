"""Generation from a live Megatron model through Megatron's inference engine."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from .. import RunError
from .compat import generate_token_ids, inference_engine, reseed_sampling
from .config import ModelConfig


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off; 1: greedy
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature}; must be > 0 (use top_k=1 for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p}; must be in (0, 1]")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig top_k={self.top_k} / max_new_tokens={self.max_new_tokens} out of range")


@dataclass
class Generation:
    tokens: list  # generated ids, ending with eos when the model stopped
    logprobs: list  # log p(token) under the sampling model (before temperature / top-k / top-p)
    stopped: bool  # ended with eos (else: hit max_new_tokens)


class _IdTokenizer:
    """The engine receives token ids; it only needs eod and a detokenize for its text fields."""

    def __init__(self, eos_id: int, vocab_size: int):
        self.eod, self.bos, self.vocab_size = eos_id, None, vocab_size

    def detokenize(self, ids, **_):
        return ""

    def tokenize(self, text):
        raise NotImplementedError("prompts reach the engine as token ids")


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class NonFiniteLogits(RunError):
    all_ranks = False  # raised on the ranks whose logits shard is non-finite


@contextlib.contextmanager
def refuse_nonfinite_logits(model, name: str):
    """Raise NonFiniteLogits on NaN or +inf logits from the output layer: Megatron's sampler would
    fail on them with an unrelated message (a device-side assert on GPU)."""
    def check(module, inputs, output):
        if not bool((output[0] < float("inf")).all()):  # NaN or +inf; padded rows are -inf by design
            raise NonFiniteLogits(f"{name}: NaN or +inf logits while generating: its weights or activations "
                                  "overflow (a faulty checkpoint, or beyond the fp16 / bf16 range)")

    layer = getattr(model, "output_layer", None)  # only on the last pipeline stage
    handle = layer.register_forward_hook(check) if layer is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


class Generator:
    """Megatron's static inference engine over ``model`` (a GPTModel, e.g. ``ddp.module``):
    generation reads the live weights, so a student generates with its current parameters."""

    def __init__(self, model, config: ModelConfig, *, eos_id: int, max_batch_size: int = 8, name: str = "model"):
        self.model, self.config, self.eos_id, self.max_batch_size = model, config, eos_id, max_batch_size
        self.name = name  # in errors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engine's own deprecation notices
            self.engine, self.controller = inference_engine(
                model, hidden_size=config.hidden_size, params_dtype=config.torch_dtype,
                padded_vocab_size=config.embedding_rows, max_batch_size=max_batch_size,
                max_sequence_length=config.max_sequence_length, tokenizer=_IdTokenizer(eos_id, config.vocab_size),
                seed=1,
            )

    @torch.no_grad()
    def generate(self, prompts: list, sampling: SamplingConfig, *, seed: int = 0) -> list:
        """Continue each prompt (a list of token ids). Sampling is reproducible from ``seed``."""
        from megatron.core.inference.sampling_params import SamplingParams

        for i, prompt in enumerate(prompts):
            if len(prompt) + sampling.max_new_tokens > self.config.max_sequence_length:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={sampling.max_new_tokens} it exceeds "
                    f"max_sequence_length={self.config.max_sequence_length}"
                )
        params = SamplingParams(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=0.0 if sampling.top_p >= 1 else sampling.top_p,
            num_tokens_to_generate=sampling.max_new_tokens, return_log_probs=True, termination_id=self.eos_id,
        )
        results = []
        with eval_mode(self.model), refuse_nonfinite_logits(self.model, self.name), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engine's deprecation notices, on every call
            for start in range(0, len(prompts), self.max_batch_size):
                chunk = prompts[start : start + self.max_batch_size]
                reseed_sampling(self.controller, seed * 1_000_003 + start)
                for tokens, logprobs in generate_token_ids(self.engine, chunk, params):
                    results.append(Generation(tokens, logprobs, bool(tokens) and tokens[-1] == self.eos_id))
        return results

"""Generation from a live Megatron model through Megatron's inference engines."""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .. import ConfigError, RunError
from ..planner import GIB, kv_cache_bytes, kv_cache_demand, kv_cache_shares
from ..validate import kv_buffer_problem
from ..seeds import stream_seed
from .engines import EngineSpec, dynamic_engine, kv_bytes_in_use, reseed_sampling, run_dynamic, run_static, static_engine
from ..config.model import ModelConfig
from ..config.rollout import EngineConfig, SamplingConfig
from .groups import ModelGroups


@dataclass
class Generation:
    tokens: list  # generated ids, ending with the end token exactly when the model stopped
    logprobs: list  # log p(token) under the sampling model (before temperature / top-k / top-p), one per token
    stopped: bool  # ended with the end token (else: the budget ran out)


@dataclass
class GenerationStats:
    """What the last ``Generator.generate`` call cost."""

    forward_passes: int = 0  # model forwards (prefill, decode and mixed steps)
    kv_bytes: int = 0  # peak KV-cache memory held (dynamic: blocks in use; static: its whole cache)
    generated_tokens: int = 0
    seconds: float = 0.0


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


@contextlib.contextmanager
def count_forwards(model, stats: GenerationStats):
    def count(module, inputs):
        stats.forward_passes += 1

    handle = model.register_forward_pre_hook(count)
    try:
        yield
    finally:
        handle.remove()


def _sampling_params(sampling: SamplingConfig, budget: int, eos_id: int):
    from megatron.core.inference.sampling_params import SamplingParams

    return SamplingParams(
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=0.0 if sampling.top_p >= 1 else sampling.top_p,
        num_tokens_to_generate=budget, return_log_probs=True, skip_prompt_log_probs=True, termination_id=eos_id,
    )


def free_gpu_bytes() -> int:
    """The free memory of the GPU with the least of it, over all ranks: the ranks of one model
    must build equal KV caches (the dynamic engine's scheduling runs replicated on each)."""
    if not torch.cuda.is_available():
        raise ConfigError("rollout.engine.kv_cache_free_fraction needs a GPU; set rollout.engine.kv_cache_gib")
    free = torch.tensor([torch.cuda.mem_get_info()[0]], dtype=torch.int64, device="cuda")
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return int(free.item())


def size_kv_caches(generators: list, free_bytes: int | None = None) -> None:
    """Turn ``kv_cache_free_fraction`` into each generator's ``kv_cache_gib``, from one reading
    of the free memory (``free_bytes``; None: ``free_gpu_bytes()``) for generators that hold
    their caches at the same time (planner.kv_cache_shares). Their later engines, rebuilt after
    each release, keep those sizes. Collective over all ranks when it reads the GPU."""
    sized = [g for g in generators if g.engine_config.name == "dynamic" and g.engine_config.kv_cache_free_fraction]
    if not sized:
        return
    fraction = sized[0].engine_config.kv_cache_free_fraction
    free = free_gpu_bytes() if free_bytes is None else free_bytes
    shares = kv_cache_shares(free, fraction, {i: g.kv_cache_demand() for i, g in enumerate(sized)})
    for i, g in enumerate(sized):
        layout = g.layout
        message = kv_buffer_problem(g.config, g.engine_config, layout["tensor"], layout["pipeline"],
                                    g.max_request_tokens, shares[i])
        if message:
            raise ConfigError(f"{g.name}: rollout.engine.kv_cache_free_fraction={fraction} of the {free / GIB:.3g} GiB "
                             f"free gives {shares[i]:.3g} GiB: {message}")
        g.engine_config = replace(g.engine_config, kv_cache_gib=shares[i], kv_cache_free_fraction=0.0)


class Generator:
    """One of Megatron's inference engines over ``model`` (a GPTModel, e.g. ``ddp.module``):
    generation reads the live weights, so a student generates with its current parameters.
    The engine (and its KV cache) is built on the first call: a generator never used holds no
    memory."""

    def __init__(self, model, config: ModelConfig, *, eos_id: int, engine: EngineConfig | None = None,
                 max_request_tokens: int | None = None, name: str = "model"):
        """``max_request_tokens``: the longest prompt + budget it will be asked for (default the
        model's max_sequence_length); the KV cache never holds more than ``max_requests`` of those."""
        self.model, self.config, self.eos_id = model, config, eos_id
        self.engine_config = engine or EngineConfig()
        self.max_request_tokens = min(max_request_tokens or config.max_sequence_length, config.max_sequence_length)
        self.name = name  # in errors
        self.stats = GenerationStats()  # of the last call
        self._engine = self._controller = None

    @property
    def max_batch_size(self) -> int:
        return self.engine_config.max_requests

    def release(self) -> None:
        """Free the engine and its KV cache; the next ``generate`` builds them again, of the same
        size, and samples the same (sampling is reseeded every call). Called between rollouts and
        training, so that the KV cache and the training step's activations never hold memory at
        once. Version-independent: 0.16's ``DynamicInferenceEngine.suspend()`` frees the KV cache
        but 0.19's keeps it by default (``KVCacheManagementMode.PERSIST``), and the static engine
        has no suspend."""
        self._engine = self._controller = None

    @property
    def layout(self) -> dict:
        """The model's own tensor and pipeline sizes (a teacher's may differ from the global ones)."""
        groups = ModelGroups.of(self.model)
        return dict(tensor=groups.tensor, pipeline=groups.pipeline)

    def kv_cache_demand(self) -> int:
        """The most KV cache bytes this generator can use on this GPU (planner.kv_cache_demand)."""
        return kv_cache_demand(self.config, self.engine_config, request_tokens=self.max_request_tokens, **self.layout)

    def _spec(self) -> EngineSpec:
        engine, config = self.engine_config, self.config
        groups = ModelGroups.of(self.model)  # the model's own layout (a teacher's may differ from the global one)
        spec = EngineSpec(
            hidden_size=config.hidden_size, params_dtype=config.torch_dtype, padded_vocab_size=config.embedding_rows,
            num_layers=config.num_layers // groups.pipeline, pg_collection=groups.pgs,
            kv_heads=config.num_query_groups or config.num_attention_heads, head_dim=config.head_dim,
            max_sequence_length=self.max_request_tokens, max_requests=engine.max_requests,
            kv_cache_gib=engine.kv_cache_gib, block_size_tokens=engine.block_size_tokens,
        )
        if engine.name == "dynamic":
            layout = self.layout
            message = kv_buffer_problem(config, engine, layout["tensor"], layout["pipeline"], self.max_request_tokens)
            if message:
                raise ConfigError(f"{self.name}: {message}")
            spec.kv_cache_gib = kv_cache_bytes(config, engine, request_tokens=self.max_request_tokens, **layout) / GIB
        return spec

    def _build(self):
        if self.engine_config.kv_cache_free_fraction:  # a generator used alone (evaluation): sized at first use
            size_kv_caches([self])
        build = dynamic_engine if self.engine_config.name == "dynamic" else static_engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engines' own deprecation notices
            # seed=1 seeds nothing that is used: every generate() reseeds sampling from its own seed
            self._engine, self._controller = build(
                self.model, self._spec(), tokenizer=_IdTokenizer(self.eos_id, self.config.vocab_size), seed=1)

    @torch.no_grad()
    def generate(self, prompts: list, sampling: SamplingConfig, *, seed: int = 0,
                 max_new_tokens: list | None = None) -> list[Generation]:
        """Continue each prompt (a list of token ids), by at most ``sampling.max_new_tokens``
        tokens, or by ``max_new_tokens[i]`` for prompt i. Sampling is reproducible from ``seed``
        (the same call gives the same samples; see the README for what else they depend on)."""
        budgets = list(max_new_tokens) if max_new_tokens is not None else [sampling.max_new_tokens] * len(prompts)
        if len(budgets) != len(prompts):
            raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")
        for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
            if budget < 1:
                raise ValueError(f"prompt {i}: max_new_tokens={budget}; must be >= 1")
            if len(prompt) + budget > self.max_request_tokens:
                limit = ("max_sequence_length" if self.max_request_tokens == self.config.max_sequence_length
                         else f"the {self.name} generator's max_request_tokens")
                raise ValueError(f"{self.name}: prompt {i} has {len(prompt)} tokens; with max_new_tokens={budget} it "
                                 f"exceeds {limit}={self.max_request_tokens}")
        if self._engine is None:
            self._build()
        self.stats = stats = GenerationStats()
        started = time.perf_counter()
        with eval_mode(self.model), refuse_nonfinite_logits(self.model, self.name), \
                count_forwards(self.model, stats), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engines' deprecation notices, on every call
            if self.engine_config.name == "dynamic":
                outs = self._generate_dynamic(prompts, budgets, sampling, seed, stats)
            else:
                outs = self._generate_static(prompts, budgets, sampling, seed, stats)
        results = [Generation(tokens, logprobs, bool(tokens) and tokens[-1] == self.eos_id) for tokens, logprobs in outs]
        stats.generated_tokens = sum(len(g.tokens) for g in results)
        stats.seconds = time.perf_counter() - started
        return results

    def _generate_dynamic(self, prompts, budgets, sampling, seed, stats):
        def record_kv(engine):
            stats.kv_bytes = max(stats.kv_bytes, kv_bytes_in_use(engine.context))

        reseed_sampling(self._controller, seed)
        params = [_sampling_params(sampling, budget, self.eos_id) for budget in budgets]
        return run_dynamic(self._engine, prompts, params, on_step=record_kv)

    def _generate_static(self, prompts, budgets, sampling, seed, stats):
        """Batches of one budget each (the static engine has one budget a batch)."""
        outs = [None] * len(prompts)
        by_budget = {}
        for i, budget in enumerate(budgets):
            by_budget.setdefault(budget, []).append(i)
        for budget, ids in sorted(by_budget.items()):
            params = _sampling_params(sampling, budget, self.eos_id)
            for start in range(0, len(ids), self.max_batch_size):
                chunk = ids[start : start + self.max_batch_size]
                reseed_sampling(self._controller, stream_seed(seed, "static_batch", budget=budget, start=start))
                for i, out in zip(chunk, run_static(self._engine, [prompts[i] for i in chunk], params)):
                    outs[i] = out
        memory = self._controller.inference_wrapped_model.inference_context.key_value_memory_dict
        stats.kv_bytes = sum(t.numel() * t.element_size() for pair in memory.values() for t in pair)
        return outs

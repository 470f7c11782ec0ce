"""Megatron's inference engines driven on token ids: construction (static and dynamic), one
generate call each, reseeding, KV accounting, and the end-token fix of the static path. The
inference API changed between megatron-core 0.16 and 0.19; each difference is a branch on
``compat.MEGATRON_VERSION`` here, said where it is."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .compat import MEGATRON_VERSION
from .patches import patch


@dataclass
class EngineSpec:
    """What either engine needs to know about the model and its memory."""

    hidden_size: int
    params_dtype: object
    padded_vocab_size: int
    num_layers: int  # this pipeline stage's
    kv_heads: int
    head_dim: int
    max_sequence_length: int
    max_requests: int  # sequences decoded at once
    kv_cache_gib: float = 0.0  # the dynamic engine's block buffer
    block_size_tokens: int = 256
    pg_collection: object = None  # the model's process groups (a teacher's may differ from the global ones)


def _wrapper_config(spec: EngineSpec):
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

    return InferenceWrapperConfig(
        hidden_size=spec.hidden_size, params_dtype=spec.params_dtype, inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=spec.padded_vocab_size, inference_max_requests=spec.max_requests,
        inference_max_seq_length=spec.max_sequence_length,
    )


def static_engine(model, spec: EngineSpec, *, tokenizer, seed: int):
    """Megatron's static inference engine over ``model``'s own weights (no copy): (engine,
    controller). It runs on its legacy path on every version (its dynamic fallback is the
    dynamic engine); < 0.19 builds its KV cache from an InferenceWrapperConfig, 0.19 dropped
    that class and takes a StaticInferenceContext (run on CPU with 0.19.2 / Python 3.12)."""
    import functools

    from megatron.core.inference.engines import static_engine
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from tqdm import tqdm

    patch(static_engine, "tqdm", functools.partial(tqdm, disable=True),
          "its per-call progress bar would interleave with the run's own progress output")
    if MEGATRON_VERSION >= (0, 19):
        from megatron.core.inference.contexts import StaticInferenceContext

        model.config.inference_sampling_seed = seed  # seeds the controller's sampling_rng
        context = StaticInferenceContext(spec.max_requests, spec.max_sequence_length)
        context.config.pg_collection = spec.pg_collection  # where 0.19's wrapper and controller read the groups
        wrapped = GPTInferenceWrapper(model, context)
        controller = controller_keeping_end_token()(wrapped, tokenizer)
    else:
        wrapped = GPTInferenceWrapper(model, _wrapper_config(spec), pg_collection=spec.pg_collection)
        controller = controller_keeping_end_token()(wrapped, tokenizer, pp_group=spec.pg_collection.pp)
    engine = StaticInferenceEngine(controller, max_batch_size=spec.max_requests, random_seed=seed, legacy=True)
    _unset_inference_mode()
    return engine, controller


def dynamic_engine(model, spec: EngineSpec, *, tokenizer, seed: int):
    """Megatron's dynamic inference engine over ``model``'s own weights: continuous batching
    (a finished request's slot is refilled at once) over a paged KV cache of
    ``spec.kv_cache_gib`` in blocks of ``spec.block_size_tokens``, at most
    ``spec.max_requests`` requests at once (the rest wait). Only the last token's logits are
    materialised: prompt log-probs are never read (they are also wrong at a chunked-prefill
    boundary in 0.16)."""
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    # tokens a step may hold (prefill chunks): above every prompt but the longest
    max_tokens = max(DynamicInferenceContext.DEFAULT_MAX_TOKENS, spec.max_requests)
    memory = dict(buffer_size_gb=spec.kv_cache_gib, block_size_tokens=spec.block_size_tokens,
                  max_requests=spec.max_requests, max_tokens=max_tokens, max_sequence_length=spec.max_sequence_length,
                  num_cuda_graphs=None, materialize_only_last_token_logits=True, use_flashinfer_fused_rope=False,
                  unified_memory_level=0)
    if MEGATRON_VERSION >= (0, 19):
        # 0.19 takes the model's TransformerConfig and an InferenceConfig; the wrapper no
        # longer takes an InferenceWrapperConfig, the engine no seed (the controller reads it)
        from megatron.core.inference.config import InferenceConfig

        model.config.inference_sampling_seed = seed
        context = DynamicInferenceContext(model.config, InferenceConfig(enable_chunked_prefill=True,
                                                                        pg_collection=spec.pg_collection, **memory))
        controller = TextGenerationController(GPTInferenceWrapper(model, context), tokenizer)
        engine = DynamicInferenceEngine(controller, context)
    else:
        groups = spec.pg_collection
        context = DynamicInferenceContext(params_dtype=spec.params_dtype, num_layers=spec.num_layers,
                                          kv_channels=spec.head_dim, num_attention_heads=spec.kv_heads,
                                          pg_collection=groups, **memory)
        wrapped = GPTInferenceWrapper(model, _wrapper_config(spec), context, pg_collection=groups)
        controller = TextGenerationController(wrapped, tokenizer, pp_group=groups.pp)
        engine = DynamicInferenceEngine(controller, context, random_seed=seed, pg_collection=groups)
    _unset_inference_mode()
    return engine, controller


def kv_bytes_in_use(context) -> int:
    """The dynamic engine's KV memory in use now (its block allocator was renamed in 0.19)."""
    allocator = context.kv_block_allocator if MEGATRON_VERSION >= (0, 19) else context.block_allocator
    return allocator.get_total_used() * context.block_size_bytes


def _unset_inference_mode() -> None:
    """0.19's engine constructors set the process-wide InferenceMode flag and never clear it;
    while set, GPTModel asserts that every forward gathers TP logits, so the training forward
    of the same model fails. It is set only around generation instead (``inference_mode``)."""
    if MEGATRON_VERSION >= (0, 19):
        from megatron.core.inference.utils import InferenceMode

        InferenceMode.unset_active()


def inference_mode():
    """The context in which an engine generates: 0.19's InferenceMode flag on (without it the
    dynamic engine, materialising only the last token's logits, samples from the wrong rows)."""
    if MEGATRON_VERSION >= (0, 19):
        from megatron.core.inference.utils import InferenceMode

        return InferenceMode.active()
    return contextlib.nullcontext()


def controller_keeping_end_token():
    """Megatron's TextGenerationController, counting the end token as generated.

    Its static path (0.16 and 0.19 alike) marks a sequence done on the step that samples the
    end token before counting that step in ``generated_length``, so the returned tokens and
    log-probs stopped one short: the end token and its log-prob were dropped, and with them
    the student's only training signal on when to stop. The sampled token and its log-prob
    are in the engine's buffers; counting the step returns them.
    """
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class Controller(TextGenerationController):
        def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                     is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
            was_done = is_generation_done_tensor.clone()
            done, lengths = super().update_generation_status(
                updated_prompts_tokens, generation_started, current_context_end_position, is_generation_done_tensor,
                generated_sequence_lengths, termination_id)
            return done, lengths + (done & ~was_done & generation_started).int()

    return Controller


def drop_inference_buffers() -> None:
    """Forget the tensors that Megatron's global memory buffer allocated while an engine
    generated: both engines run under ``torch.inference_mode``, and a tensor made there cannot
    be written in place by a training forward later (sequence parallelism all-gathers into
    this buffer), which would fail with "Inplace update to inference tensor outside
    InferenceMode". The buffer allocates them again on demand."""
    from megatron.core import parallel_state

    if parallel_state._GLOBAL_MEMORY_BUFFER is not None:
        buffer = parallel_state._GLOBAL_MEMORY_BUFFER.buffer
        for key in [k for k, t in buffer.items() if t.is_inference()]:
            del buffer[key]


def run_static(engine, prompts: list, sampling_params) -> list:
    """The static engine on token-id prompts (one batch, one budget): [(generated ids, their
    log-probs)] in prompt order."""
    from megatron.core.inference.inference_request import InferenceRequest

    requests = [InferenceRequest(request_id=str(i), prompt="", prompt_tokens=list(p), sampling_params=sampling_params)
                for i, p in enumerate(prompts)]
    with inference_mode():
        done = {r.request_id: r for r in engine.generate(inference_requests=requests)}
    drop_inference_buffers()
    out = []
    for request in requests:
        r = done[request.request_id]
        tokens = r.generated_tokens.tolist()[: r.generated_length]
        out.append((tokens, list(r.generated_log_probs)[: len(tokens)]))
    return out


def run_dynamic(engine, prompts: list, sampling_params: list, on_step=None) -> list:
    """The dynamic engine on token-id prompts, each with its own SamplingParams, all submitted
    at once: [(generated ids, their log-probs)] in prompt order. ``on_step(engine)`` runs after
    every engine step (statistics)."""
    for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
        engine.add_request(i, list(prompt), params)
    done = {}
    with inference_mode():
        while engine.has_unfinished_requests():
            for record in engine.step_modern()["finished_request_records"]:
                request = record.merge()  # one request, also across an eviction and its re-prefill
                done[request.request_id] = request
            if on_step is not None:
                on_step(engine)
    drop_inference_buffers()
    missing = sorted(set(range(len(prompts))) - set(done))
    if missing:
        raise RuntimeError(f"the dynamic engine returned no result for requests {missing[:10]}")
    return [(list(done[i].generated_tokens), list(done[i].generated_log_probs)) for i in range(len(prompts))]


def reseed_sampling(controller, seed: int) -> None:
    """Make the next generate call's sampling reproducible from ``seed``."""
    rng = getattr(controller, "sampling_rng", None)
    if rng is None:  # not seen in 0.16; newer versions may hold their generator elsewhere
        raise NotImplementedError(f"cannot reseed sampling on megatron-core {MEGATRON_VERSION}")
    rng.manual_seed(seed)

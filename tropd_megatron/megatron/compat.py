"""The one place for megatron-core version differences (0.16 on CPU, up to 0.19 on GPU) and
for optional TransformerEngine."""
from __future__ import annotations

import importlib.metadata

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

MEGATRON_VERSION = tuple(int(p) for p in importlib.metadata.version("megatron-core").split(".")[:2])

try:  # TransformerEngine needs CUDA; use its fused layers whenever it imports
    import transformer_engine  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except Exception:  # ImportError, or TE failing to load its CUDA libraries
    HAVE_TE = False


def gpt_layer_spec(qk_layernorm: bool = False):
    """TransformerEngine layers when available, Megatron's local layers otherwise."""
    spec = get_gpt_layer_with_transformer_engine_spec if HAVE_TE else get_gpt_layer_local_spec
    return spec(qk_layernorm=qk_layernorm)


def inference_engine(model, *, hidden_size: int, params_dtype, padded_vocab_size: int, max_batch_size: int,
                     max_sequence_length: int, tokenizer, seed: int):
    """Megatron's inference engine over ``model``'s own weights (no copy): (engine, controller).

    Every version uses the static engine on its legacy path (its dynamic fallback needs CUDA),
    so generation is the same code, and the same log-probs, on 0.16 and 0.19. Only its
    construction differs: < 0.19 builds the KV-cache context from an InferenceWrapperConfig;
    0.19 dropped that class and takes a StaticInferenceContext, reading hidden size, dtype and
    vocabulary from the model itself (run on CPU with 0.19.2 / Python 3.12).
    """
    import functools

    from megatron.core.inference.engines import static_engine
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from tqdm import tqdm

    # its per-call "static requests" bar would interleave with the run's own progress output
    static_engine.tqdm = functools.partial(tqdm, disable=True)
    if MEGATRON_VERSION >= (0, 19):
        # Not DynamicInferenceEngine: its attention asserts flash-attn >= 2.7.3 / FA3 / FA4 and
        # runs their varlen KV-cache kernels (transformer/attention.py:1328, :1574), so it cannot
        # run or be tested on CPU. The legacy static engine is still shipped (deprecated only).
        from megatron.core.inference.contexts import StaticInferenceContext

        model.config.inference_sampling_seed = seed  # seeds the controller's sampling_rng
        wrapped = GPTInferenceWrapper(model, StaticInferenceContext(max_batch_size, max_sequence_length))
    else:
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

        wrapped = GPTInferenceWrapper(model, InferenceWrapperConfig(
            hidden_size=hidden_size, params_dtype=params_dtype, inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=padded_vocab_size, inference_max_requests=max_batch_size,
            inference_max_seq_length=max_sequence_length,
        ))
    controller = _controller_keeping_end_token()(wrapped, tokenizer)
    engine = StaticInferenceEngine(controller, max_batch_size=max_batch_size, random_seed=seed, legacy=True)
    if MEGATRON_VERSION >= (0, 19):
        # 0.19's engine constructor sets the process-wide InferenceMode flag and the static engine
        # never clears it; while set, GPTModel asserts that every forward gathers TP logits, so
        # the training forward of the same model fails. Set it only around generation instead.
        from megatron.core.inference.utils import InferenceMode

        InferenceMode.unset_active()
    return engine, controller


def _controller_keeping_end_token():
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


def generate_token_ids(engine, prompts: list, sampling_params) -> list:
    """Run ``engine`` on token-id prompts: [(generated ids, their log-probs)] in prompt order."""
    from megatron.core.inference.inference_request import InferenceRequest

    requests = [InferenceRequest(request_id=str(i), prompt="", prompt_tokens=list(p), sampling_params=sampling_params)
                for i, p in enumerate(prompts)]
    if MEGATRON_VERSION >= (0, 19):  # see inference_engine: the flag is on only while generating
        from megatron.core.inference.utils import InferenceMode

        with InferenceMode.active():
            done = {r.request_id: r for r in engine.generate(inference_requests=requests)}
    else:
        done = {r.request_id: r for r in engine.generate(inference_requests=requests)}
    out = []
    for request in requests:
        r = done[request.request_id]
        tokens = r.generated_tokens.tolist()[: r.generated_length]
        out.append((tokens, list(r.generated_log_probs)[: len(tokens)]))
    return out


def reseed_sampling(controller, seed: int) -> None:
    """Make the next generate call's sampling reproducible from ``seed``."""
    rng = getattr(controller, "sampling_rng", None)
    if rng is None:  # not seen in 0.16; newer versions may hold their generator elsewhere
        raise NotImplementedError(f"cannot reseed sampling on megatron-core {MEGATRON_VERSION}")
    rng.manual_seed(seed)

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


def gpt_layer_spec():
    """TransformerEngine layers when available, Megatron's local layers otherwise."""
    return get_gpt_layer_with_transformer_engine_spec() if HAVE_TE else get_gpt_layer_local_spec()


def static_inference_engine(model, *, hidden_size: int, params_dtype, padded_vocab_size: int, max_batch_size: int,
                            max_sequence_length: int, tokenizer, seed: int):
    """Megatron's static-batch inference engine over ``model``'s own weights (no copy).

    Returns (engine, controller). megatron-core 0.16 builds it from an InferenceWrapperConfig
    and the legacy static path (the dynamic fallback needs CUDA).
    """
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    config = InferenceWrapperConfig(
        hidden_size=hidden_size, params_dtype=params_dtype, inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=padded_vocab_size, inference_max_requests=max_batch_size,
        inference_max_seq_length=max_sequence_length,
    )
    controller = TextGenerationController(GPTInferenceWrapper(model, config), tokenizer)
    engine = StaticInferenceEngine(controller, max_batch_size=max_batch_size, random_seed=seed, legacy=True)
    return engine, controller

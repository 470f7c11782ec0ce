"""The GPT decoder's layer spec: TransformerEngine's layers when TE imports, Megatron's local
layers otherwise, with norms that also work under sequence parallelism."""
from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from .compat import HAVE_TE

class SequenceParallelTorchNorm:
    """Megatron's torch norm (LayerNorm / RMSNorm) for the local layers, with sequence
    parallelism too: Megatron's own wrapper refuses it, but a norm over a sequence shard only
    needs its weights' gradients summed over the tensor-parallel group, which
    ``finalize_model_grads`` does for parameters marked ``sequence_parallel`` (as
    TransformerEngine's norms are marked)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        plain = copy.copy(config)
        plain.sequence_parallel = False  # the wrapper's assert; the norm itself is the same
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def gpt_decoder_spec(config, qk_layernorm: bool = False):
    """The decoder of this rank's pipeline stage: TransformerEngine layers when available,
    Megatron's local layers otherwise, their norms SequenceParallelTorchNorm."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if HAVE_TE:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    layer = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm)
    parts = layer.submodules
    parts.input_layernorm = parts.pre_mlp_layernorm = SequenceParallelTorchNorm
    attention = parts.self_attention.submodules
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = SequenceParallelTorchNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelTorchNorm)

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

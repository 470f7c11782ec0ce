"""The one place for megatron-core's version and for optional TransformerEngine: what the rest
branches on (``MEGATRON_VERSION`` in engines.py, where the inference API changed between 0.16 and
0.19; ``HAVE_TE`` in layer_spec.py, step.py and checkpoint.py)."""
from __future__ import annotations

import importlib.metadata

MEGATRON_VERSION = tuple(int(p) for p in importlib.metadata.version("megatron-core").split(".")[:2])

try:  # TransformerEngine needs CUDA; use its fused layers whenever it imports
    import transformer_engine  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec  # noqa: F401

    HAVE_TE = True
except Exception:  # ImportError, or TE failing to load its CUDA libraries
    HAVE_TE = False

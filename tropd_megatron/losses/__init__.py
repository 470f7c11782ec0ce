"""Sharded distillation losses: pure torch + torch.distributed, no Megatron import.

Logits are the local tensor-parallel vocabulary shard [..., V/TP]; the tensor-parallel
process group is an argument (None: unsharded). Collectives move O(tokens * k) numbers.
"""
from .collectives import VocabShard
from .config import (
    DISTILLATION_OBJECTIVES,
    DenseKLConfig,
    EOPDConfig,
    ObjectiveConfig,
    OPDConfig,
    REOPOLDConfig,
    SFTConfig,
    TrOPDConfig,
)
from .distillation import distillation_loss, reduce_metrics, supervised_loss
from .estimators import kl_estimators, topk_forward_kl
from .objectives import prefix_beta, sequence_token_keys, token_uniforms
from .teacher import TeacherSignal
from .vocab import (
    dense_forward_kl,
    dense_reverse_kl,
    entropy,
    gather_logprobs,
    log_softmax,
    log_softmax_stats,
    swap_token_logits,
    vocab_parallel_topk,
)

__all__ = [
    "DISTILLATION_OBJECTIVES",
    "DenseKLConfig",
    "EOPDConfig",
    "OPDConfig",
    "ObjectiveConfig",
    "REOPOLDConfig",
    "SFTConfig",
    "TeacherSignal",
    "TrOPDConfig",
    "VocabShard",
    "dense_forward_kl",
    "dense_reverse_kl",
    "distillation_loss",
    "entropy",
    "gather_logprobs",
    "kl_estimators",
    "swap_token_logits",
    "log_softmax",
    "log_softmax_stats",
    "prefix_beta",
    "reduce_metrics",
    "sequence_token_keys",
    "supervised_loss",
    "token_uniforms",
    "topk_forward_kl",
    "vocab_parallel_topk",
]

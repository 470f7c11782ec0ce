"""Student and co-located frozen teacher: Megatron GPTModels on the same ranks, the student on
Megatron's global groups, the teacher on those or on a layout of its own (``groups``)."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from .. import ConfigError
from ..losses import VocabShard
from . import cpu
from .compat import HAVE_TE
from .layer_spec import gpt_decoder_spec
from ..config.model import ModelConfig, ParallelConfig
from .groups import ModelGroups


def initialize(parallel: ParallelConfig, seed: int = 0) -> None:
    """Process group (NCCL on GPU, gloo on CPU), Megatron's model-parallel groups, seeds.

    Every rank is seeded identically: with CPU initialisation the weights are then the same
    at any TP size and data-parallel replicas never diverge.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo" if cpu.on_cpu() else "nccl")
    cpu.enable()
    if not cpu.on_cpu():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    if parallel_state.model_parallel_is_initialized():  # a second run in the same job (make compare)
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size())
        if current != (parallel.tensor, parallel.pipeline):
            raise ValueError(f"model parallelism is already initialised as (tensor, pipeline) = {current}, "
                             f"not {(parallel.tensor, parallel.pipeline)}")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor, pipeline_model_parallel_size=parallel.pipeline
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def device_settings(*, on_gpu: bool, have_te: bool) -> dict:
    """The TransformerConfig settings that follow the device and the kernel library; a pure
    function, so that the GPU's choices are tested on CPU.

    - CPU: weights drawn whole on the host and sliced (``use_cpu_initialization``: identical
      weights at any TP size for one seed, what the parity tests rely on). GPU: drawn on the
      device per shard (a 70B model's full host-side init would take minutes before its
      checkpoint overwrites it; random-weight runs then differ across TP sizes). Initialisation
      stays on for models loaded next: Megatron's local layers mark their weights as
      tensor-parallel only while initialising them, and unmarked shards drop out of the
      gradient norm on every TP rank but the first (measured: a resumed TP=2 run's grad norm
      0.85x the uninterrupted one's; Megatron-Bridge keeps it on for the same reason, its
      PR 992). On the device it costs one draw per shard.
    - GPU with TransformerEngine: fused RoPE (the unfused THD path splits and syncs per packed
      sequence in every layer), fused SwiGLU (``bias_activation_fusion``; Megatron's
      ``bias_swiglu`` takes no bias too) and fused weight-gradient accumulation into the DDP's
      fp32 ``main_grad`` (TE's linear layers). Without TE these kernels do not exist.
    - The p2p sync calls ``torch.cuda.synchronize`` (GPU only).
    """
    fused = on_gpu and have_te
    return dict(use_cpu_initialization=not on_gpu, batch_p2p_sync=on_gpu, apply_rope_fusion=fused,
                bias_activation_fusion=fused, gradient_accumulation_fusion=fused)


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    dtype = model.torch_dtype
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        qk_layernorm=model.qk_layernorm,
        add_qkv_bias=model.add_qkv_bias,
        recompute_granularity=None if model.recompute == "none" else model.recompute,
        recompute_method="uniform" if model.recompute == "full" else None,
        recompute_num_layers=1 if model.recompute == "full" else None,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=False,
        init_method_std=model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor > 1,  # no effect at TP = 1
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        calculate_per_token_loss=True,  # the loss returns (sum, token count): global token mean
        **device_settings(on_gpu=not cpu.on_cpu(), have_te=HAVE_TE),
    )


def build_gpt(model: ModelConfig, parallel: ParallelConfig, *, frozen: bool = False,
              groups: ModelGroups | None = None) -> GPTModel:
    """This rank's pipeline stage of the model. ``frozen``: eval mode, no gradients (the
    teacher: it gets no optimizer state either, since only the student is handed to one).
    ``groups``: the process groups of a layout other than Megatron's global one (a teacher on
    its own ``parallel``, see groups.layout_groups); None: the global groups."""
    parallel.check(dist.get_world_size(), model)
    if groups is not None and (groups.tensor, groups.pipeline) != (parallel.tensor, parallel.pipeline):
        raise ValueError(f"groups of (tensor, pipeline) = {(groups.tensor, groups.pipeline)} for a model at "
                         f"{(parallel.tensor, parallel.pipeline)}")
    config = transformer_config(model, parallel)
    gpt = GPTModel(
        config,
        gpt_decoder_spec(config, model.qk_layernorm),
        vocab_size=model.embedding_rows,
        max_sequence_length=model.max_sequence_length,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
        share_embeddings_and_output_weights=not model.untie_embeddings,
        pre_process=groups.first_stage if groups else parallel_state.is_pipeline_first_stage(),
        post_process=groups.last_stage if groups else parallel_state.is_pipeline_last_stage(),
        pg_collection=groups.pgs if groups else None,
    )
    if not cpu.on_cpu():
        gpt.cuda()
    if gpt.post_process and model.embedding_rows > model.vocab_size:
        _mask_padded_vocabulary(gpt, model.vocab_size)
    if frozen:
        gpt.eval()
        gpt.requires_grad_(False)
    return gpt


def _mask_padded_vocabulary(gpt: GPTModel, vocab_size: int) -> None:
    """Padded vocabulary rows get -inf logits, in training and in generation alike: the
    engine's sampling and log-probs then cover the true vocabulary, as the losses do."""
    shard = VocabShard.of(
        (gpt.output_layer.weight if gpt.output_layer.weight is not None else gpt.shared_embedding_or_output_weight()).shape[0],
        gpt.pg_collection.tp, vocab_size,
    )
    def hook(module, inputs, output):
        logits, bias = output
        # a local shard in training; the full vocabulary when inference gathers the output
        logits[..., shard.valid if logits.shape[-1] == shard.size else vocab_size :] = float("-inf")
        return logits, bias

    gpt.output_layer.register_forward_hook(hook)


def shared_vocabulary_rows(student: ModelConfig, teacher: ModelConfig, tensor_parallel: int
                           ) -> tuple[ModelConfig, ModelConfig]:
    """(student, teacher) with one embedding row count: the losses compare the two models'
    logits shard by shard, so both pad to the larger count, rounded up to a multiple of
    ``tensor_parallel`` (both models' TP sizes: their least common multiple; a 152064-row
    teacher with a 151936-row student: both get 152064 rows). Padding rows are masked, so
    this changes no result. They must share the tokenizer's vocabulary."""
    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(
            f"teacher vocabulary ({teacher.vocab_size} tokens) differs from the student's "
            f"({student.vocab_size} tokens): they must share one tokenizer"
        )
    rows = -(-max(student.embedding_rows, teacher.embedding_rows) // tensor_parallel) * tensor_parallel
    return replace(student, padded_vocab_size=rows), replace(teacher, padded_vocab_size=rows)

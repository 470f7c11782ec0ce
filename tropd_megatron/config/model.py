"""Models, parallel layouts, optimizer. Defaults live here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional
from .. import ConfigError

if TYPE_CHECKING:
    import torch

RECOMPUTE = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp16")  # torch.float32, torch.bfloat16, torch.float16


@dataclass
class ModelConfig:
    """A Llama/Qwen-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int  # the tokenizer's true size
    max_sequence_length: int
    num_query_groups: int | None = None  # None: multi-head attention
    kv_channels: int | None = None  # per-head size; None: hidden_size / num_attention_heads
    padded_vocab_size: int | None = None  # embedding rows (>= vocab_size); None: vocab_size
    rotary_base: float = 10000
    rope_scaling_factor: float | None = None  # Llama 3.1-style RoPE scaling (Megatron's fixed 1 / 4 / 8192)
    norm_epsilon: float = 1e-5
    normalization: str = "RMSNorm"
    swiglu: bool = True
    untie_embeddings: bool = True
    qk_layernorm: bool = False  # Qwen3
    add_qkv_bias: bool = False  # Qwen2 / 2.5
    init_method_std: float = 0.02
    dtype: str = "fp32"
    recompute: str = "none"  # activation recompute: none | selective | full

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"ModelConfig.dtype={self.dtype!r}; expected one of {DTYPES}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"ModelConfig.recompute={self.recompute!r}; expected one of {RECOMPUTE}")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ConfigError(
                f"ModelConfig.padded_vocab_size={self.padded_vocab_size} is below vocab_size={self.vocab_size}"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"ModelConfig.num_query_groups={groups} must divide num_attention_heads={self.num_attention_heads}"
            )

    @property
    def embedding_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch  # here, not at import: the configuration layer needs no torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # Megatron's sequence parallelism: activations outside the tensor-parallel matmuls (norms,
    # residuals, dropout) split along the sequence over the TP group (TP > 1 only)
    sequence_parallel: bool = False

    def check(self, world_size: int, model: ModelConfig) -> None:
        """Refuse layouts that cannot work, naming the sizes."""
        if world_size % (self.tensor * self.pipeline):
            raise ConfigError(f"world size {world_size} is not divisible by tensor x pipeline = {self.tensor * self.pipeline}")
        groups = model.num_query_groups or model.num_attention_heads
        for name, value in (("num_attention_heads", model.num_attention_heads), ("num_query_groups", groups),
                            ("padded vocabulary", model.embedding_rows), ("ffn_hidden_size", model.ffn_hidden_size)):
            if value % self.tensor:
                raise ConfigError(f"tensor parallel size {self.tensor} does not divide {name}={value}")
        if model.num_layers % self.pipeline:
            raise ConfigError(f"pipeline parallel size {self.pipeline} does not divide num_layers={model.num_layers}")


@dataclass
class TeacherParallelConfig:
    """``teacher.parallel``: the teacher's own layout, in the same job on the same ranks (a 70B
    teacher at TP 8 beside an 8B student at TP 2 x DP 4). A size left None is the student's
    (``parallel.tensor`` / ``parallel.pipeline``: both models on Megatron's global groups, as
    without this setting); its data-parallel size is the world size / (tensor x pipeline).
    Sequence parallelism follows ``parallel.sequence_parallel``."""

    tensor: Optional[int] = None
    pipeline: Optional[int] = None

    def __post_init__(self):
        for name in ("tensor", "pipeline"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"teacher.parallel.{name}={getattr(self, name)}; must be >= 1 "
                                 "(or null: the student's)")

    def resolve(self, student: ParallelConfig) -> ParallelConfig:
        """The teacher's layout as a ParallelConfig."""
        return ParallelConfig(self.tensor or student.tensor, self.pipeline or student.pipeline,
                              sequence_parallel=student.sequence_parallel)


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # or "sgd"
    # Megatron's distributed optimizer: Adam's fp32 state sharded over data-parallel ranks
    # (Megatron implements it for Adam only: SGD always runs the plain optimizer)
    distributed_optimizer: bool = True
    lr: float = 5e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8  # Megatron's default
    clip_grad: float = 1.0
    # skip an update whose gradient norm (before clipping) exceeds spike_factor x the median of
    # the last spike_window applied updates' norms (from the 5th applied update on); 0: off
    spike_factor: float = 0.0
    spike_window: int = 20
    # stop the run (exit 1) after this many updates in a row were skipped (no loss tokens,
    # non-finite gradients, spikes): something is broken and the weights no longer move; 0: never
    max_skipped_in_a_row: int = 10

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"OptimConfig.optimizer={self.optimizer!r}; expected 'adam' or 'sgd'")
        if self.spike_factor and (self.spike_factor <= 1 or self.spike_window < 1):
            raise ConfigError(f"OptimConfig.spike_factor={self.spike_factor} must be > 1 (or 0: off) and "
                             f"spike_window={self.spike_window} >= 1")
        if self.max_skipped_in_a_row < 0:
            raise ConfigError(f"OptimConfig.max_skipped_in_a_row={self.max_skipped_in_a_row} must be >= 0 (0: never stop)")

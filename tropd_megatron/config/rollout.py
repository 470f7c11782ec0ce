"""Rollouts: sampling, the inference engine, how many rollouts and how they are batched,
teacher-prefix guidance. Defaults live here."""
from __future__ import annotations

from dataclasses import dataclass, field
from .. import ConfigError


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off; 1: greedy
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"SamplingConfig.temperature={self.temperature}; must be > 0 (use top_k=1 for greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingConfig.top_p={self.top_p}; must be in (0, 1]")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ConfigError(f"SamplingConfig top_k={self.top_k} / max_new_tokens={self.max_new_tokens} out of range")


ENGINES = ("dynamic", "static")


@dataclass
class EngineConfig:
    """How generation runs (``rollout.engine``), for the student's and the teacher's generator
    alike (each holds its own KV cache).

    ``dynamic``: Megatron's dynamic engine: continuous batching (a finished sequence's slot is
    refilled at once) over a paged KV cache of ``kv_cache_gib`` GiB in blocks of
    ``block_size_tokens`` (flash-attn 2 on GPU needs 256), at most ``max_requests`` sequences
    at once; requests that do not fit wait and still finish. ``static``: the static engine,
    batches of ``max_requests`` prompts that each decode until their longest sequence ends,
    with a KV cache of ``max_requests`` x max_sequence_length held from the first call on.
    """

    name: str = "dynamic"
    max_requests: int = 64  # sequences generated at once
    kv_cache_gib: float = 1.0  # dynamic: each generator's KV buffer
    # dynamic, on GPU: instead of kv_cache_gib, this share of the GPU memory left free once the
    # models and Adam's moments exist, read once (the least over all ranks) before the first
    # rollout and split between the generators that generate in proportion to what each can
    # use (size_kv_caches); 0: off
    kv_cache_free_fraction: float = 0.0
    block_size_tokens: int = 256

    def __post_init__(self):
        if self.name not in ENGINES:
            raise ConfigError(f"rollout.engine.name={self.name!r}; expected one of {ENGINES}")
        if self.max_requests < 1 or self.block_size_tokens < 1:
            raise ConfigError(f"rollout.engine.max_requests={self.max_requests} and block_size_tokens="
                             f"{self.block_size_tokens} must be >= 1")
        if self.kv_cache_gib <= 0 and not 0 < self.kv_cache_free_fraction < 1:
            raise ConfigError(f"rollout.engine.kv_cache_gib={self.kv_cache_gib} must be > 0 (or set "
                             "kv_cache_free_fraction in (0, 1))")
        if not 0 <= self.kv_cache_free_fraction < 1:
            raise ConfigError(f"rollout.engine.kv_cache_free_fraction={self.kv_cache_free_fraction}; must be in [0, 1)")


@dataclass
class RolloutConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # the inference engine of both generators (student and teacher), its concurrency and KV memory
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollouts_per_prompt: int = 4
    micro_batch_size: int = 4  # rows per micro-batch (packed: each row holds several rollouts)
    # pack rollouts into rows of row_tokens tokens, each attending only to itself (False: one
    # rollout a row, padded to the step's longest)
    packing: bool = True
    row_tokens: int = 0  # 0: the longest rollout a run can produce (max_prompt_tokens + max_new_tokens - 1)
    prefix_share_start: float = 0.0  # share of rollouts that start with a teacher prefix
    prefix_share_end: float = 0.0
    prefix_tokens_start: int = 0  # L, the teacher prefix length
    prefix_tokens_end: int = 0

    def __post_init__(self):
        for name in ("prefix_share_start", "prefix_share_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"RolloutConfig.{name}={getattr(self, name)}; must be in [0, 1]")
        for name in ("prefix_tokens_start", "prefix_tokens_end"):
            if not 0 <= getattr(self, name) < self.sampling.max_new_tokens:
                raise ConfigError(f"RolloutConfig.{name}={getattr(self, name)}; must be in [0, max_new_tokens)")
        if min(self.rollouts_per_prompt, self.micro_batch_size) < 1 or self.row_tokens < 0:
            raise ConfigError("RolloutConfig.rollouts_per_prompt and micro_batch_size must be >= 1, row_tokens >= 0")

    @property
    def writes_prefixes(self) -> bool:
        """Whether the teacher writes prefixes at some point of training (it then generates,
        and its generator holds a KV cache)."""
        return (max(self.prefix_share_start, self.prefix_share_end) > 0
                and max(self.prefix_tokens_start, self.prefix_tokens_end) > 0)

    def packed_row_tokens(self, max_prompt_tokens: int) -> int:
        """Tokens per packed row: ``row_tokens``, or the longest rollout the run can produce."""
        return self.row_tokens or max_prompt_tokens + self.sampling.max_new_tokens - 1

    def prefix_schedule(self, step: int, total_steps: int) -> tuple[float, int]:
        """(share, L) at ``step``: linear from the start values to the end values."""
        t = min(max(step, 0), total_steps) / max(total_steps, 1)
        share = self.prefix_share_start + t * (self.prefix_share_end - self.prefix_share_start)
        length = round(self.prefix_tokens_start + t * (self.prefix_tokens_end - self.prefix_tokens_start))
        return share, length

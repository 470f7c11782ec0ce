"""Per-GPU memory plan of a run: will the co-located teacher and student fit the named GPU?

Pure arithmetic on a RunConfig (no torch, no Megatron): bytes per GPU for each thing a rank
holds at its peak, the student's backward pass, when everything below is alive at once.

- student weights: model dtype; gradients: fp32 (the DDP buffer reduces in fp32); optimizer:
  Megatron's distributed optimizer (Adam; ``optim.distributed_optimizer``), fp32 main params +
  state sharded over data parallel; SGD's plain optimizer unsharded.
- teacher weights: model dtype, no gradients, no optimizer.
- student activations for one micro-batch of ``micro_batch_size`` rows of the row length
  (packed: ``rollout.row_tokens``, by default the longest possible rollout; padded: the
  longest possible rollout) (Korthikanti et al. 2022, see ``activation_bytes``), its logits,
  and the teacher signal of every micro-batch of the step (``train_step`` computes them all
  before the student pass). The step is planned at its worst case, every rollout of the
  longest length: then packing holds one rollout a row, as padding does; with shorter
  rollouts packing needs fewer micro-batches (less teacher signal, less compute).
- KV caches (``kv_cache_bytes``), held only while generating (the trainer releases both
  generators between rollouts and training): the dynamic engine's block buffer
  (``rollout.engine.kv_cache_gib``, or ``kv_cache_free_fraction`` of what the rest leaves
  free, ``kv_cache_shares``; capped at what ``max_requests`` requests can use), or the
  static engine's ``max_requests`` x the longest request. The teacher's generator is used (and
  allocates) only with teacher-prefix guidance, for prompts + prefixes.
- a fixed CUDA context / NCCL / allocator allowance on GPUs.

The peak is what is held throughout (weights, gradients, optimizer state, context) plus the
larger of the two phases: the KV caches while generating, or the training step's activations,
logits and teacher signal.

The teacher's no-grad pass and generation peak lower (one layer's working set and one
logits shard) and are not added. With pipeline parallelism the sums are for the heaviest
stage's weights plus first-stage activations plus last-stage logits, an upper bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional
from . import ConfigError

if TYPE_CHECKING:  # annotations only: the planner itself needs neither torch nor Megatron
    from .config.model import ModelConfig
    from .run_config import RunConfig

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Usable memory per GPU in bytes: the marketing size in decimal GB. An H100 80GB shows
# 81,559 MiB (79.6 GiB) in nvidia-smi, so 80e9 bytes (74.5 GiB) leaves ~5 GiB for allocator
# fragmentation on top of CONTEXT_BYTES. "cpu" has no limit.
GPU_MEMORY: dict[str, Optional[int]] = {
    "H100-80GB": 80 * 10**9,
    "H200-141GB": 141 * 10**9,
    "A100-80GB": 80 * 10**9,
    "A100-40GB": 40 * 10**9,
    "cpu": None,
}
# CUDA context, NCCL communicator buffers, cuBLAS / TransformerEngine workspaces per GPU
CONTEXT_BYTES = 3 * GIB
# bytes per parameter the optimizer keeps beyond the model's own weights and gradients:
# Adam's m and v, SGD's momentum (Megatron's SGD uses momentum), all fp32
OPTIMIZER_STATE_BYTES = {"adam": 8, "sgd": 4}
# TeacherSignal per token: token_logprobs, entropy (fp32) and valid (bool); per top-k entry:
# an int32 id and an fp32 log-prob
SIGNAL_TOKEN_BYTES = 2 * 4 + 1
SIGNAL_TOPK_BYTES = 4 + 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _norm_parameters(model: ModelConfig, size: int) -> int:
    """Weights of one normalisation over ``size`` features: RMSNorm a scale, LayerNorm also a bias."""
    return size * (2 if model.normalization == "LayerNorm" else 1)


def _layer_linear_parameters(model: ModelConfig) -> int:
    """The tensor-parallel (sharded) weights of one decoder layer: QKV (+ bias), output
    projection, MLP. QKV rows = (heads + 2 x query groups) x head_dim; the MLP has 2 x ffn
    input rows with SwiGLU (gate and up), else ffn; its output projection ffn x hidden."""
    groups = model.num_query_groups or model.num_attention_heads
    query = model.num_attention_heads * model.head_dim
    qkv_rows = query + 2 * groups * model.head_dim
    qkv = qkv_rows * model.hidden_size + (qkv_rows if model.add_qkv_bias else 0)
    mlp = (3 if model.swiglu else 2) * model.ffn_hidden_size * model.hidden_size
    return qkv + query * model.hidden_size + mlp


def _layer_norm_parameters(model: ModelConfig) -> int:
    """The replicated weights of one decoder layer: the two pre-norms, plus Qwen3's q/k norms
    (one head_dim scale each)."""
    qk = 2 * _norm_parameters(model, model.head_dim) if model.qk_layernorm else 0
    return 2 * _norm_parameters(model, model.hidden_size) + qk


def parameter_count(model: ModelConfig) -> int:
    """Exact parameter count of the GPTModel Megatron builds from ``model``: embedding
    (embedding_rows x hidden), the layers, the final norm, and an output layer of the
    embedding's size unless the embeddings are tied."""
    embedding = model.embedding_rows * model.hidden_size
    output = embedding if model.untie_embeddings else 0
    layers = model.num_layers * (_layer_linear_parameters(model) + _layer_norm_parameters(model))
    return embedding + layers + _norm_parameters(model, model.hidden_size) + output


def stage_parameters(model: ModelConfig, tensor: int, pipeline: int) -> int:
    """Parameters on one GPU of the heaviest pipeline stage: linear layers and the vocabulary
    split over ``tensor``, norms replicated. The first stage holds the embedding, the last the
    final norm and output layer (with tied embeddings and pipeline > 1 the last stage keeps
    its own copy of the embedding as output layer, as Megatron does)."""
    layers = model.num_layers // pipeline * (
        _layer_linear_parameters(model) // tensor + _layer_norm_parameters(model))
    vocab = model.embedding_rows // tensor * model.hidden_size
    head = _norm_parameters(model, model.hidden_size) + (vocab if model.untie_embeddings or pipeline > 1 else 0)
    if pipeline == 1:
        return vocab + layers + head
    return max(vocab + layers, layers + head)


def optimizer_bytes_per_parameter(dtype: str, optimizer: str) -> int:
    """fp32 optimizer bytes per parameter before data-parallel sharding: Adam's m and v
    (8), or SGD's momentum (4), plus 4 for fp32 main params when the model is not fp32
    (Adam with bf16 weights: 12)."""
    return OPTIMIZER_STATE_BYTES[optimizer] + (0 if dtype == "fp32" else 4)


def activation_bytes(model: ModelConfig, *, sequence: int, micro_batch: int, tensor: int, pipeline: int,
                     microbatches: int, sequence_parallel: bool = False) -> int:
    """Activations the first pipeline stage stores for the backward pass, in bytes.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", Table 2, per layer with s = sequence, b = micro_batch, h = hidden, a = heads,
    t = tensor. Tensor parallelism alone leaves the 10sbh of norm inputs, residuals and
    masks replicated; sequence parallelism splits them over t too:

    - recompute none:      s*b*h*(10 + 24/t + 5*a*s/(h*t)),  with SP s*b*h*(34/t + 5*a*s/(h*t))
    - recompute selective: s*b*h*(10 + 24/t),                with SP s*b*h*34/t
    - recompute full:      2*s*b*h (each layer's input; with SP 2*s*b*h/t) + one layer at
      "none", rebuilt in backward

    The constants count 16-bit activations; fp32 models double them. Under 1F1B the first
    stage holds min(pipeline, microbatches) micro-batches of its num_layers/pipeline layers.
    The formula is for a GPT layer (MHA, 4h GeLU MLP); for GQA / SwiGLU it is an estimate, and
    an upper bound for "none" when flash / fused attention does not store the scores.
    """
    s, b, h, a, t = sequence, micro_batch, model.hidden_size, model.num_attention_heads, tensor
    scale = DTYPE_BYTES[model.dtype] / 2
    replicated = 10 / t if sequence_parallel else 10  # norm inputs, residuals, dropout masks
    scores = 5 * a * s / (h * t)
    full_layer = s * b * h * (replicated + 24 / t + scores) * scale
    kept_per_layer = {"none": full_layer, "selective": s * b * h * (replicated + 24 / t) * scale,
                      "full": 2 * s * b * h * scale / (t if sequence_parallel else 1)}[model.recompute]
    stored = model.num_layers // pipeline * min(pipeline, microbatches) * kept_per_layer
    return int(stored + (full_layer if model.recompute == "full" else 0))


def kv_token_bytes(model: ModelConfig, *, tensor: int, pipeline: int) -> int:
    """K and V of one token on one GPU: num_layers/pipeline layers x query_groups/tensor heads x
    head_dim x the model dtype, twice."""
    groups = model.num_query_groups or model.num_attention_heads
    return 2 * (model.num_layers // pipeline) * (groups // tensor) * model.head_dim * DTYPE_BYTES[model.dtype]


def kv_cache_demand(model: ModelConfig, engine, *, tensor: int, pipeline: int, request_tokens: int) -> int:
    """The most KV cache one generator can use on one GPU: ``engine.max_requests`` requests of
    ``request_tokens`` (the longest prompt + budget it is asked for); dynamic: in whole blocks,
    plus the engine's one dummy block."""
    token = kv_token_bytes(model, tensor=tensor, pipeline=pipeline)
    if engine.name == "static":
        return engine.max_requests * request_tokens * token
    block = engine.block_size_tokens * token
    return (engine.max_requests * _ceil_div(request_tokens, engine.block_size_tokens) + 1) * block


def kv_cache_bytes(model: ModelConfig, engine, *, tensor: int, pipeline: int, request_tokens: int,
                   buffer_gib: Optional[float] = None) -> int:
    """One generator's KV cache on one GPU while it generates. static: ``kv_cache_demand``,
    whatever the sequences' real lengths. dynamic: its block buffer, ``buffer_gib`` (default
    ``engine.kv_cache_gib``) in whole blocks, but never more than ``kv_cache_demand`` (a bigger
    buffer would never be filled)."""
    demand = kv_cache_demand(model, engine, tensor=tensor, pipeline=pipeline, request_tokens=request_tokens)
    if engine.name == "static":
        return demand
    block = engine.block_size_tokens * kv_token_bytes(model, tensor=tensor, pipeline=pipeline)
    return min(int((engine.kv_cache_gib if buffer_gib is None else buffer_gib) * GIB) // block * block, demand)


def kv_cache_shares(free_bytes: int, fraction: float, demands: dict) -> dict:
    """``rollout.engine.kv_cache_free_fraction`` as GiB per generator, from ONE reading of the
    free memory taken once everything held throughout the run exists (weights, gradients,
    Adam's moments): ``fraction`` of it, split in proportion to ``demands`` ({name:
    ``kv_cache_demand``}). Generators sized one after the other from their own readings would
    each take the fraction of what the other left, together more than the fraction."""
    total = sum(demands.values())
    if total <= 0 or free_bytes <= 0:
        raise ConfigError(f"no KV cache to size: {free_bytes} bytes free, demands {demands}")
    return {name: fraction * free_bytes * demand / total / GIB for name, demand in demands.items()}


@dataclass
class MemoryPlan:
    """Per-GPU bytes of one run's layout. ``capacity`` None: no limit (CPU)."""

    name: str
    gpu: str
    gpus: int
    tensor: int  # the student's layout
    pipeline: int
    data_parallel: int
    teacher_tensor: int  # the teacher's (teacher.parallel; the student's by default)
    teacher_pipeline: int
    teacher_data_parallel: int
    teacher_parameters: int
    student_parameters: int
    sequence: int  # tokens per micro-batch row
    rollouts_per_rank: int
    items: dict[str, int]
    capacity: Optional[int]
    phases: dict[str, str] = field(default_factory=dict)  # item -> "rollouts" / "training"; absent: throughout

    def phase_total(self, phase: str) -> int:
        """Bytes held during ``phase``: what is held throughout plus that phase's own items."""
        return sum(v for k, v in self.items.items() if self.phases.get(k, phase) == phase)

    @property
    def total(self) -> int:
        """The peak: the larger phase."""
        return max(self.phase_total("rollouts"), self.phase_total("training"))

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def format(self) -> str:
        """A table in GiB: the layout, the parameter counts, each item, total against capacity."""
        width = max(len(k) for k in self.items) + 2
        student = f"tensor {self.tensor} x pipeline {self.pipeline} x data {self.data_parallel}"
        teacher = f"tensor {self.teacher_tensor} x pipeline {self.teacher_pipeline} x data {self.teacher_data_parallel}"
        lines = [
            f"{self.name} on {self.gpus} x {self.gpu}: "
            + (student if student == teacher else f"student {student}; teacher {teacher}"),
            f"teacher {_count(self.teacher_parameters)} parameters, student {_count(self.student_parameters)}; "
            f"{self.rollouts_per_rank} rollouts per data-parallel rank, micro-batch rows of {self.sequence} tokens",
            f"{'per GPU':<{width}}{'GiB':>9}",
        ]
        lines += [f"{k:<{width}}{v / GIB:9.2f}" + (f"  ({self.phases[k]} only)" if k in self.phases else "")
                  for k, v in self.items.items()]
        rollouts, training = self.phase_total("rollouts"), self.phase_total("training")
        lines.append(f"{'rollouts / training':<{width}}{rollouts / GIB:9.2f} / {training / GIB:.2f}")
        lines.append(f"{'total (the larger)':<{width}}{self.total / GIB:9.2f}")
        if self.capacity is None:
            lines.append(f"{'capacity':<{width}}{'no limit':>9}")
            return "\n".join(lines)
        lines.append(f"{'capacity (' + self.gpu + ')':<{width}}{self.capacity / GIB:9.2f}")
        margin = (self.capacity - self.total) / GIB
        lines.append(f"fits: {margin:.2f} GiB to spare" if self.fits else f"does not fit: {-margin:.2f} GiB over")
        return "\n".join(lines)


def _count(n: int) -> str:
    """70553706496 -> '70.55B', 1234567 -> '1.23M'."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def gpu_capacity(gpu: str) -> Optional[int]:
    """Usable bytes of the named GPU (None for "cpu"); ValueError naming the known GPUs."""
    if gpu not in GPU_MEMORY:
        raise ConfigError(f"unknown gpu {gpu!r}; known: {', '.join(GPU_MEMORY)}")
    return GPU_MEMORY[gpu]


def request_lengths(config: RunConfig) -> dict:
    """The longest prompt + budget each generator is asked for: the student's rollouts and
    evaluations, the teacher's prefixes (what sizes their KV caches)."""
    r = config.rollout
    return {"student": config.data.max_prompt_tokens + max(r.sampling.max_new_tokens, config.eval_max_new_tokens()),
            "teacher": config.data.max_prompt_tokens + max(r.prefix_tokens_start, r.prefix_tokens_end, 1)}


def plan(config: RunConfig, gpus: Optional[int] = None) -> MemoryPlan:
    """The per-GPU memory plan of ``config`` on ``gpus`` GPUs (the world size; default the
    fewest both layouts fit, ``RunConfig.min_world_size``). ValueError when the layout cannot
    run: world size or model shapes not divisible, prompts_per_step not divisible by data parallel.

    With the teacher on its own layout, a rank holds the teacher's weights at that layout and,
    while signals are exchanged, both the signals its teacher group scored (its share of every
    student rank's micro-batches) and those of its own student rank."""
    tp, pp = config.parallel.tensor, config.parallel.pipeline
    t = config.teacher_parallel
    gpus = config.min_world_size if gpus is None else gpus
    if gpus < 1:
        raise ConfigError(f"gpus={gpus}; must be >= 1")
    capacity = gpu_capacity(config.gpu)
    from .validate import validate  # (validate plans KV buffers with this module)

    validate(config, gpus)
    dp, teacher_dp = gpus // (tp * pp), gpus // (t.tensor * t.pipeline)
    own_layout = config.teacher_on_own_layout
    prompts = config.schedule.prompts_per_step
    teacher, student, rollout = config.teacher.model, config.student.model, config.rollout
    on_gpu = capacity is not None
    rollouts = prompts * rollout.rollouts_per_prompt // dp
    microbatches = _ceil_div(rollouts, rollout.micro_batch_size)
    sequence = (rollout.packed_row_tokens(config.data.max_prompt_tokens) if rollout.packing
                else config.data.max_prompt_tokens + rollout.sampling.max_new_tokens - 1)
    tokens_per_step = microbatches * rollout.micro_batch_size * sequence  # the worst case: a rollout a row
    student_params = stage_parameters(student, tp, pp)
    sequence_parallel = config.parallel.sequence_parallel and tp > 1
    # the distributed optimizer (Adam) shards its state over data parallel
    distributed = config.optim.distributed_optimizer and config.optim.optimizer == "adam"
    optimizer_shards = dp if distributed else 1

    items = {  # held throughout
        f"student weights ({student.dtype})": student_params * DTYPE_BYTES[student.dtype],
        "student gradients (fp32)": student_params * 4,
        f"student optimizer ({config.optim.optimizer}, 1/{optimizer_shards} shard)":
            _ceil_div(student_params * optimizer_bytes_per_parameter(student.dtype, config.optim.optimizer),
                      optimizer_shards),
        f"teacher weights ({teacher.dtype})":
            stage_parameters(teacher, t.tensor, t.pipeline) * DTYPE_BYTES[teacher.dtype],
    }
    training = {  # held while the step runs, released before the next rollouts
        f"student activations (recompute {student.recompute}{', SP' if sequence_parallel else ''})": activation_bytes(
            student, sequence=sequence, micro_batch=rollout.micro_batch_size, tensor=tp, pipeline=pp,
            microbatches=microbatches, sequence_parallel=sequence_parallel),
        # fp32 logits shard for the softmax and its gradient
        "student logits (fp32, x2)": rollout.micro_batch_size * sequence * student.embedding_rows // tp * 4 * 2,
    }
    if config.objective.selected().teacher_input == "logits":  # train_step keeps every micro-batch's logits shard
        training[f"teacher logits, dense ({teacher.dtype})"] = (
            tokens_per_step * teacher.embedding_rows // tp * DTYPE_BYTES[teacher.dtype])
    else:
        topk = config.objective.selected().signal_topk
        per_token = SIGNAL_TOKEN_BYTES + topk * SIGNAL_TOPK_BYTES
        training[f"teacher signal (top-{topk})"] = tokens_per_step * per_token
        if own_layout:  # what this rank's teacher group scored for every student rank it serves
            training["teacher signal, the teacher group's share"] = (_ceil_div(tokens_per_step * dp, teacher_dp)
                                                                     * per_token)
    items.update(training)
    phases = dict.fromkeys(training, "training")
    if on_gpu:
        items["CUDA context, NCCL, workspaces"] = CONTEXT_BYTES
    engine = rollout.engine
    lengths = request_lengths(config)
    # the teacher only generates (and so allocates its cache) when it writes prefixes
    generators = {"student": (student, tp, pp)}
    if rollout.writes_prefixes:
        generators["teacher"] = (teacher, t.tensor, t.pipeline)
    demands = {w: kv_cache_demand(m, engine, tensor=mt, pipeline=mp, request_tokens=lengths[w])
               for w, (m, mt, mp) in generators.items()}
    buffers = dict.fromkeys(generators)  # None: engine.kv_cache_gib
    if engine.name == "dynamic" and engine.kv_cache_free_fraction and on_gpu:  # as the trainer sizes them
        free = capacity - sum(v for k, v in items.items() if k not in phases)
        buffers = kv_cache_shares(free, engine.kv_cache_free_fraction, demands) if free > 0 else dict.fromkeys(
            generators, 0.0)
    for w, (m, mt, mp) in generators.items():
        name = f"{w} KV cache ({engine.name}, {engine.max_requests} requests)"
        items[name] = kv_cache_bytes(m, engine, tensor=mt, pipeline=mp, request_tokens=lengths[w],
                                     buffer_gib=buffers[w])
        phases[name] = "rollouts"

    return MemoryPlan(
        name=config.name, gpu=config.gpu, gpus=gpus, tensor=tp, pipeline=pp, data_parallel=dp,
        teacher_tensor=t.tensor, teacher_pipeline=t.pipeline, teacher_data_parallel=teacher_dp,
        teacher_parameters=parameter_count(teacher), student_parameters=parameter_count(student),
        sequence=sequence, rollouts_per_rank=rollouts, items=items, capacity=capacity, phases=phases,
    )


def student_tensor_choices(config: RunConfig, gpus: int) -> dict:
    """{student tensor-parallel size: its MemoryPlan, or why it cannot run} for every power of
    two up to ``gpus``, the teacher's layout as configured: the smallest size that fits is the
    throughput choice for generation (fewest all-reduces per decoded token; data parallel for
    the rest)."""
    from dataclasses import replace

    choices = {}
    tensor = 1
    while tensor <= gpus:
        candidate = replace(config, parallel=replace(config.parallel, tensor=tensor),
                            teacher=replace(config.teacher, parallel=replace(
                                config.teacher.parallel, tensor=config.teacher_parallel.tensor)))
        try:
            choices[tensor] = plan(candidate, gpus)
        except ValueError as e:
            choices[tensor] = str(e).splitlines()[-1].strip()
        tensor *= 2
    return choices


def smallest_fitting_student_tensor(config: RunConfig, gpus: int) -> Optional[int]:
    """The smallest student tensor-parallel size whose plan fits (None: none does)."""
    return next((tp for tp, p in student_tensor_choices(config, gpus).items()
                 if isinstance(p, MemoryPlan) and p.fits), None)

"""The TrOPD training step on Megatron's pipeline schedules.

One step = a no-grad teacher pass over the micro-batches (the compact ``TeacherSignal``, or
the logits shard in dense mode, kept on the last pipeline stage) -> the student's
forward/backward through ``get_forward_backward_func`` with ``distillation_loss`` on the last
stage -> Megatron's optimizer (clipping, LR schedule). The gradient is the global token mean:
Megatron's ``finalize_model_grads`` divides by the token count summed over data-parallel
ranks and micro-batches.
"""
from __future__ import annotations

import statistics
import time
from functools import partial
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..losses import (ObjectiveConfig, TeacherSignal, distillation_loss, reduce_metrics, supervised_loss,
                      swap_token_logits)
from .. import ConfigError
from . import cpu
from .compat import HAVE_TE
from ..config.model import ModelConfig, OptimConfig, ParallelConfig
from .groups import ModelGroups
from .models import build_gpt


@dataclass
class MicroBatch:
    """tokens [B, S] model input; labels [B, S] the token each position predicts (the sampled
    response tokens); loss_mask [B, S]; optional prefix_mask and rollout_logprobs [B, S].

    ``segments`` [B, S] (int, packed rows): which sequence of its row each position belongs to,
    0 for the padding at a row's end; each sequence attends only to itself (None: one sequence
    per row). ``trust_keys`` [B, S]: the stochastic trust mask's keys, computed per sequence
    before packing (None: from labels and loss_mask per row)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    prefix_mask: Optional[torch.Tensor] = None
    rollout_logprobs: Optional[torch.Tensor] = None
    segments: Optional[torch.Tensor] = None
    trust_keys: Optional[torch.Tensor] = None

    def model_inputs(self):
        """GPTModel's (tokens, position_ids, attention_mask[, packed_seq_params]). Packed rows:
        TransformerEngine gets the rows as one THD sequence with its boundaries
        (PackedSeqParams); Megatron's local layers a block-diagonal causal mask (their
        attention takes no PackedSeqParams)."""
        B, S = self.tokens.shape
        device = self.tokens.device
        if self.segments is None:
            positions = torch.arange(S, device=device).expand(B, S)
            # explicit causal mask (True = masked): a None mask reaches a "cuda" literal on CPU
            causal = torch.ones(S, S, dtype=torch.bool, device=device).triu(1)[None, None]
            return self.tokens, positions, causal
        positions = segment_positions(self.segments)
        if HAVE_TE:
            return self.tokens.reshape(1, B * S), positions.reshape(1, B * S), None, thd_params(self.segments)
        same = self.segments[:, :, None] == self.segments[:, None, :]
        causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        return self.tokens, positions, ~(same & causal)[:, None]

    def to(self, device) -> "MicroBatch":
        """The micro-batch on ``device`` (rollouts are packed on the host)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def model_shape(self) -> tuple[int, int]:
        """(micro-batch size, sequence length) as the model sees them: the pipeline's p2p shape."""
        B, S = self.tokens.shape
        return (1, B * S) if self.segments is not None and HAVE_TE else (B, S)

    def logits_view(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits as [B, S, V/TP] (a THD forward returns [1, B x S, V/TP])."""
        return logits.reshape(*self.tokens.shape, logits.shape[-1])


def on_device(microbatches: list[MicroBatch]) -> list[MicroBatch]:
    """The micro-batches on this rank's device (its GPU; the CPU under cpu.py's stand-ins)."""
    device = torch.cuda.current_device()
    return [mb.to(device) for mb in microbatches]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """[B, S] the position of each token inside its sequence (a new sequence starts where the
    segment id changes)."""
    B, S = segments.shape
    index = torch.arange(S, device=segments.device).expand(B, S)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, index, 0), dim=1).values
    return index - first


def thd_params(segments: torch.Tensor):
    """PackedSeqParams for rows flattened into one THD sequence: every segment, the row-end
    padding included, is a sequence of its own."""
    from megatron.core.packed_seq_params import PackedSeqParams

    flat = segments.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: segments.shape[1]] = True  # every row starts a sequence
    bounds = torch.cat([torch.nonzero(starts).flatten(), torch.tensor([flat.numel()], device=flat.device)])
    cu = bounds.to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


@dataclass
class Student:
    model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    spike_guard: Optional["SpikeGuard"] = None


@dataclass
class SpikeGuard:
    """Flags a gradient norm above ``factor`` x the median of the last ``window`` applied
    updates' norms, once ``MIN_HISTORY`` are known. Its history is part of a run's state
    (``norms``: saved with the checkpoint so that a resumed run decides the same)."""

    factor: float
    window: int
    norms: list = field(default_factory=list)
    MIN_HISTORY = 5

    def threshold(self) -> Optional[float]:
        return self.factor * statistics.median(self.norms) if len(self.norms) >= self.MIN_HISTORY else None

    def record(self, norm: float) -> None:
        self.norms = (self.norms + [float(norm)])[-self.window:]


def build_student(model: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, total_steps: int) -> Student:
    if optim.warmup_steps and optim.warmup_steps >= total_steps:
        raise ConfigError(f"OptimConfig.warmup_steps={optim.warmup_steps} must be below total_steps={total_steps}")
    gpt = build_gpt(model, parallel)
    config = gpt.config
    distributed = optim.distributed_optimizer and optim.optimizer == "adam"  # CPU and GPU alike
    ddp = DistributedDataParallel(
        config=config,
        # overlap: each gradient bucket is reduced as soon as the last micro-batch's backward
        # has filled it, behind the rest of that backward (CPU and GPU alike)
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed,
                                                 overlap_grad_reduce=True),
        module=gpt,
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=optim.optimizer, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=model.dtype == "bf16", fp16=model.dtype == "fp16", params_dtype=model.torch_dtype,
            use_distributed_optimizer=distributed,
        ),
        [ddp],
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(total_steps, 1), lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    guard = None
    if optim.spike_factor:
        if model.dtype == "fp16":  # its loss scaler updates on every prepare_grads: the guard would count twice
            raise ConfigError("OptimConfig.spike_factor is not supported with ModelConfig.dtype='fp16' (use bf16)")
        guard = SpikeGuard(optim.spike_factor, optim.spike_window)
    return Student(ddp, optimizer, scheduler, guard)


def _schedule(model, microbatches: list[MicroBatch], items: list, forward_step, forward_only: bool):
    """Megatron's pipeline schedule over ``items`` (one per micro-batch, fed to forward_step),
    on the model's own process groups (a teacher's may differ from the global ones)."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    groups = ModelGroups.of(model)
    B, S = microbatches[0].model_shape()  # under PP every micro-batch has this shape
    return get_forward_backward_func(pp_size=groups.pipeline)(
        forward_step_func=forward_step, data_iterator=iter(items), model=[model],
        num_microbatches=len(items), seq_length=S, micro_batch_size=B, forward_only=forward_only,
        p2p_communicator=P2PCommunicator(pp_group=groups.pgs.pp, config=model.config), pg_collection=groups.pgs,
    )


@torch.no_grad()
def teacher_outputs(teacher, microbatches: list[MicroBatch], *, topk: int, dense: bool, vocab_size: int,
                    end_tokens: Optional[tuple] = None) -> list:
    """Per micro-batch on the teacher's last pipeline stage: a TeacherSignal (compact) or the
    teacher's logits shard (dense); None on other stages. ``end_tokens`` (student's, teacher's
    end-of-turn id) when they differ: the teacher's logits read in the student's ids
    (swap_token_logits). Runs on the teacher's own groups (``ModelGroups.of``)."""
    outputs: list = []
    groups = ModelGroups.of(teacher)
    tp_group = groups.pgs.tp
    if not microbatches:  # a teacher group with no work this step (teacher_layout)
        return []
    microbatches = on_device(microbatches)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)

        def keep(logits):
            logits = mb.logits_view(logits)
            if end_tokens is not None:
                logits = swap_token_logits(logits, *end_tokens, tp_group=tp_group)
            outputs.append(logits.detach() if dense else TeacherSignal.from_logits(
                logits, mb.labels, topk=topk, tp_group=tp_group, vocab_size=vocab_size))
            return logits.new_zeros(()), torch.ones((), dtype=torch.int), {}

        return model(*mb.model_inputs()), keep

    _schedule(teacher, microbatches, microbatches, forward_step, forward_only=True)
    return outputs if groups.last_stage else [None] * len(microbatches)


def any_rank(local: bool) -> bool:
    """Whether ``local`` holds on any rank of the job (one all-reduce, so that every rank
    takes the same decision)."""
    flag = torch.tensor([int(local)], device="cpu" if cpu.on_cpu() else "cuda")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _gradients_finite(model) -> bool:
    """Whether every rank's gradients are finite."""
    return not any_rank(not all(bool(torch.isfinite(p.main_grad).all()) for p in model.parameters()
                                if getattr(p, "main_grad", None) is not None))


@dataclass
class StepResult:
    metrics: dict  # reduced over data-parallel ranks (last pipeline stage; empty elsewhere)
    grad_norm: Optional[float]
    lr: float
    skipped: bool  # no update (weights, optimizer state and LR schedule unchanged)
    skip_reason: Optional[str]  # why: no loss tokens, non-finite gradients on some rank, a gradient-norm spike
    seconds: dict  # teacher / student / optimizer wall time


def train_step(
    student: Student,
    teacher,
    microbatches: list[MicroBatch],
    objective: ObjectiveConfig,
    *,
    vocab_size: int,
    step: int,
    total_steps: int,
    dense: bool = False,
    end_tokens: Optional[tuple] = None,
) -> StepResult:
    """One optimizer step on ``microbatches``. ``teacher``: the teacher GPTModel on the
    student's layout, a ``LayoutTeacher`` on its own, or None for an objective that needs none
    (``teacher_input == "none"``: SFTConfig);
    ``end_tokens``: see teacher_outputs."""
    supervised = objective.teacher_input == "none"
    microbatches = on_device(microbatches)
    t0 = time.perf_counter()
    from .teacher_layout import LayoutTeacher  # it builds on this module

    score = teacher.outputs if isinstance(teacher, LayoutTeacher) else partial(teacher_outputs, teacher)
    signals = [None] * len(microbatches) if supervised else score(
        microbatches, topk=objective.signal_topk, dense=dense, vocab_size=vocab_size, end_tokens=end_tokens)
    t1 = time.perf_counter()
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def forward_step(data_iterator, model):
        mb, signal = next(data_iterator)

        def loss_func(logits):
            logits = mb.logits_view(logits)
            if supervised:
                return supervised_loss(logits, mb.labels, mb.loss_mask, tp_group=tp_group, vocab_size=vocab_size)
            return distillation_loss(
                logits, signal, mb.labels, mb.loss_mask, objective, prefix_mask=mb.prefix_mask,
                rollout_logprobs=mb.rollout_logprobs, tp_group=tp_group, vocab_size=vocab_size,
                step=step, total_steps=total_steps, trust_keys=mb.trust_keys,
            )

        return model(*mb.model_inputs()), loss_func

    student.model.zero_grad_buffer()
    student.optimizer.zero_grad()
    collected = _schedule(student.model, microbatches, list(zip(microbatches, signals)), forward_step,
                          forward_only=False)
    t2 = time.perf_counter()
    # Megatron's fp32 and bf16 optimizers apply non-finite gradients (only fp16 loss scaling
    # checks): refuse the update here so the weights never become non-finite
    updated, grad_norm, skip = False, None, None
    last_stage = parallel_state.is_pipeline_last_stage()
    # Every token masked (no response tokens, or a teacher that is non-finite everywhere): the
    # gradient is zero, but Adam's momentum and weight decay would still move the weights
    if not any_rank(last_stage and sum(float(m["tokens"]) for m in collected) > 0):
        skip = "no loss tokens (every token masked)"
    elif not _gradients_finite(student.model):
        skip = "non-finite gradients"
    elif student.spike_guard is not None and (threshold := student.spike_guard.threshold()) is not None:
        # prepare_grads only copies the model's gradients into the optimizer's (bf16 / fp32), so
        # the norm can be read before deciding; step() repeats it. The norm is the same on every rank.
        student.optimizer.prepare_grads()
        grad_norm = float(student.optimizer.get_grad_norm())
        if grad_norm > threshold:
            guard = student.spike_guard
            skip = f"gradient norm {grad_norm:.3g} > {guard.factor:g} x median {threshold / guard.factor:.3g}"
    if skip is None:
        updated, grad_norm, _ = student.optimizer.step()
        if updated and student.spike_guard is not None:
            student.spike_guard.record(grad_norm)
    if updated:
        student.scheduler.step(increment=1)
    t3 = time.perf_counter()
    metrics = {}
    if last_stage:
        sums = {k: sum(m[k] for m in collected) for k in collected[0]}
        metrics = reduce_metrics(sums, parallel_state.get_data_parallel_group())
    return StepResult(
        metrics=metrics, grad_norm=grad_norm, lr=student.optimizer.param_groups[0]["lr"], skipped=not updated,
        skip_reason=skip if skip or updated else "the optimizer found inf / nan",
        seconds={"teacher": t1 - t0, "student": t2 - t1, "optimizer": t3 - t2},
    )

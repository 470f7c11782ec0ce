"""Run megatron-core on CPU (gloo): every CUDA assumption of megatron-core in one place.

``enable()`` is a no-op when CUDA is available, so the same code runs on GPU with NCCL
unchanged. On CPU it:
- rewrites ``device="cuda"`` literals and ``Tensor.cuda()`` (pipeline schedules' token
  counter, optimizer, grad clipping) to the CPU, and answers ``Tensor.type()`` with the CUDA
  type names that the optimizer's and grad clipping's checks expect, through one
  TorchFunctionMode;
- gives ``torch.cuda.current_device/synchronize/empty_cache/current_stream/Event`` CPU
  stand-ins (attention memory buffer, DDP, p2p, timers);
- points megatron's model-parallel RNG tracker at the CPU generator;
- lets Megatron's dynamic inference engine run: NVTX ranges as no-ops, ``pin_memory`` off,
  pure-torch paged-KV attention in place of flash-attn's ``flash_attn_varlen_func`` (prefill
  and mixed steps) and ``flash_attn_with_kvcache`` (decode steps), the flash-attn version
  check answered, triton's KV-append kernel off (it asserts CUDA tensors), steps not padded
  to 64 tokens, the pipeline-parallel logits broadcast's CUDA-tensor assert answered.
Callers must still pass an explicit attention mask (None reaches a "cuda" literal) and use
``batch_p2p_sync=False``; sequence parallelism on Megatron's local layers takes the norm of
``layer_spec.gpt_decoder_spec`` (Megatron's torch norms refuse it, on CPU and GPU alike).
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.overrides import TorchFunctionMode

from .patches import patch as _patch

_MODE = None


def _is_cuda(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):  # an ordinal names a CUDA device
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_device(value):
    return torch.device("cpu") if _is_cuda(value) else value


class _CudaAsCpu(TorchFunctionMode):
    # every torch call passes here: a call without keyword arguments to any other function
    # returns after one set lookup
    _REWRITTEN = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            kwargs = dict(kwargs)
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            if kwargs.get("pin_memory"):  # pinned host memory needs CUDA
                kwargs["pin_memory"] = False
        elif func not in self._REWRITTEN:
            return func(*args)
        else:
            kwargs = {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple(_cpu_device(a) for a in args)
        return func(*args, **kwargs)


class _Event:
    """CPU stand-in for torch.cuda.Event (wall-clock timing)."""

    def __init__(self, enable_timing: bool = False, **_):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return 1e3 * (end.t - self.t)


class _Stream:
    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event


def _paged_attention(q, k_cache, v_cache, block_table, q_lengths, k_lengths, softmax_scale):
    """Attention of each request's queries over its keys in the paged KV cache.

    q [R, Lq, Hq, D] (padded per request); k_cache, v_cache [blocks, block_size, Hkv, D];
    block_table [>= R, max blocks] (the request's block ids, in order); q_lengths, k_lengths
    [R]. Causal as flash-attn aligns it when queries are fewer than keys (bottom-right: the
    last query sees every key), grouped-query heads as flash-attn groups them (query head h
    reads KV head h // (Hq / Hkv)). Returns [R, Lq, Hq, D], zero at padding queries."""
    R, Lq, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    Lk = max(int(k_lengths.max()), 1) if R else 1
    table = block_table[:R, : -(-Lk // block_size)].long().clamp_min(0)
    held = torch.arange(Lk)[None, :] < k_lengths.long()[:, None]  # [R, Lk]
    k = k_cache[table].reshape(R, -1, Hkv, D)[:, :Lk]
    # slots past a request's keys hold whatever the buffer held (torch.empty: NaN too); a zero
    # weight times NaN is NaN, so the values there are zeroed, not only given zero weight
    v = v_cache[table].reshape(R, -1, Hkv, D)[:, :Lk].masked_fill(~held[..., None, None], 0)
    grouped = q.reshape(R, Lq, Hkv, Hq // Hkv, D).float()
    scores = torch.einsum("rqkgd,rtkd->rkgqt", grouped, k.float()) * softmax_scale
    qi = torch.arange(Lq)[None, :, None]
    kj = torch.arange(Lk)[None, None, :]
    offset = (k_lengths - q_lengths).long()[:, None, None]
    allowed = held[:, None, :] & (kj <= qi + offset)  # [R, Lq, Lk]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padding query sees no key
    out = torch.einsum("rkgqt,rtkd->rqkgd", probs, v.float())
    return out.reshape(R, Lq, Hq, D).to(q.dtype)


def _flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                            causal=True, block_table=None, **_):
    """flash_attn_varlen_func over a paged KV cache: q [total queries, Hq, D] packed by request."""
    assert causal and block_table is not None, "the CPU stand-in covers the dynamic engine's paged, causal call"
    q_lengths = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    k_lengths = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    R = q_lengths.numel()
    padded = q.new_zeros(R, int(max_seqlen_q), *q.shape[1:])
    rows = torch.repeat_interleave(torch.arange(R), q_lengths.long())
    cols = torch.arange(rows.numel()) - cu_seqlens_q[:-1].long()[rows]
    padded[rows, cols] = q[: rows.numel()]
    out = _paged_attention(padded, k, v, block_table, q_lengths, k_lengths,
                           softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5)
    result = q.new_zeros(q.shape)
    result[: rows.numel()] = out[rows, cols]
    return result


def _flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, causal=True, block_table=None,
                             softmax_scale=None, **_):
    """flash_attn_with_kvcache for decode steps: q [R, 1, Hq, D], one new query per request."""
    assert block_table is not None, "the CPU stand-in covers the dynamic engine's paged call"
    lengths = cache_seqlens.long()
    return _paged_attention(q, k_cache, v_cache, block_table, torch.ones_like(lengths), lengths,
                            softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5)


def _nvtx_noop(*args, **kwargs):
    return None


def _is_a_tensor(tensor) -> None:
    assert tensor is not None


def _enable_dynamic_inference() -> None:
    """The dynamic engine's CUDA-only pieces, in the modules that bound them at import."""
    import importlib

    from megatron.core.transformer import attention

    engine = importlib.import_module("megatron.core.inference.engines.dynamic_engine")
    for owner in (torch.cuda.nvtx, engine):
        for name in ("range_push", "range_pop"):
            _patch(owner, name, _nvtx_noop, 'NVTX ranges; CPU torch raises "NVTX functions not installed"')
    _patch(attention, "is_fa_min_version", lambda *a, **k: True, "the dynamic path's flash-attn version assert")
    _patch(attention, "flash_attn_varlen_func", _flash_attn_varlen_func, "flash-attn's prefill / mixed-step kernel")
    _patch(attention, "flash_attn_with_kvcache", _flash_attn_with_kvcache, "flash-attn's decode kernel")
    communication = importlib.import_module("megatron.core.inference.communication_utils")
    _patch(communication, "_is_cuda", _is_a_tensor, "pipeline-parallel generation asserts CUDA tensors")
    context = importlib.import_module("megatron.core.inference.contexts.dynamic_context")
    _patch(context.DynamicInferenceContext, "TOKEN_ROUNDER", 1,
           "steps padded to multiples of 64 tokens for GPU kernel and CUDA-graph shapes are compute on CPU "
           "(4x on a mixed step of a few prompts)")
    if getattr(context, "triton_append_key_value_cache", None) is not None:  # only where triton imports
        _patch(context, "triton_append_key_value_cache", None,
               "triton's KV append asserts CUDA tensors; the torch indexing path runs")


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def enable() -> None:
    """Install the CPU stand-ins (idempotent; nothing happens when CUDA is available)."""
    global _MODE
    if not on_cpu() or _MODE is not None:
        return
    from megatron.core.tensor_parallel import random as mp_random

    cuda = torch.cuda
    stream = _Stream()
    for name, value in (
        ("current_device", lambda: torch.device("cpu")),  # used as device=..., torch.Generator(device=...)
        ("synchronize", lambda device=None: None),
        ("empty_cache", lambda: None),
        ("current_stream", lambda device=None: stream),
        ("default_stream", lambda device=None: stream),
        ("Stream", lambda *a, **k: _Stream()),
        ("stream", lambda s=None: contextlib.nullcontext()),
        ("Event", _Event),
        ("manual_seed", torch.manual_seed),
        ("get_rng_state", lambda device="cuda": torch.get_rng_state()),
        ("set_rng_state", lambda state, device="cuda": torch.set_rng_state(state)),
    ):
        _patch(cuda, name, value, "torch.cuda without CUDA: attention buffers, DDP, p2p, timers, the RNG tracker")
    _patch(mp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state(),
           "the model-parallel RNG tracker on the CPU generator")
    _patch(mp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state),
           "the model-parallel RNG tracker on the CPU generator", leading_parameters=("new_state",))
    # The tracker warns when the CPU generator moves inside a "GPU" RNG fork; here they are one.
    logging.getLogger(mp_random.__name__).setLevel(logging.ERROR)
    _enable_dynamic_inference()
    _MODE = _CudaAsCpu()
    _MODE.__enter__()

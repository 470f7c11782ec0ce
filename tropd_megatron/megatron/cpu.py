"""Run megatron-core on CPU (gloo): every CUDA assumption of megatron-core in one place.

``enable()`` is a no-op when CUDA is available, so the same code runs on GPU with NCCL
unchanged. On CPU it:
- rewrites ``device="cuda"`` literals and ``Tensor.cuda()`` (pipeline schedules' token
  counter, optimizer, grad clipping) to the CPU, and answers ``Tensor.type()`` with the CUDA
  type names that the optimizer's and grad clipping's checks expect, through one
  TorchFunctionMode;
- gives ``torch.cuda.current_device/synchronize/empty_cache/current_stream/Event`` CPU
  stand-ins (attention memory buffer, DDP, p2p, timers);
- points megatron's model-parallel RNG tracker at the CPU generator.
Callers must still pass an explicit attention mask (None reaches a "cuda" literal), keep
``sequence_parallel`` off (torch norms fail with it on CPU) and use ``batch_p2p_sync=False``.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.overrides import TorchFunctionMode

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
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
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
    cuda.current_device = lambda: torch.device("cpu")  # used as device=..., torch.Generator(device=...)
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda device=None: stream
    cuda.default_stream = lambda device=None: stream
    cuda.Stream = lambda *a, **k: _Stream()
    cuda.stream = lambda s=None: contextlib.nullcontext()
    cuda.Event = _Event
    cuda.manual_seed = torch.manual_seed
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The tracker warns when the CPU generator moves inside a "GPU" RNG fork; here they are one.
    logging.getLogger(mp_random.__name__).setLevel(logging.ERROR)
    _MODE = _CudaAsCpu()
    _MODE.__enter__()

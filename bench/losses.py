"""Forward+backward time, peak memory and collectives of the sharded distillation losses,
against Megatron's vocab_parallel_cross_entropy and a naive loss that all-gathers the
full-vocabulary logits first, all measured in the same run.

    torchrun --nproc-per-node 2 bench/losses.py [--tokens 4096] [--vocab 32768] [--dtype fp32]

CPU (gloo) or, when CUDA is available, one GPU per rank (NCCL). Peak memory is the peak
above what was allocated before the call (inputs included there): on GPU from the CUDA
allocator; on CPU from the process's peak RSS (VmHWM, reset before each call), measured for
every row before any timing, with glibc's mmap threshold at 64 KiB so that every tensor
maps fresh pages and freed ones leave the RSS at once. Timing then runs with glibc's largest
mmap threshold (32 MiB) and no heap trimming, so small temporaries are reused as a caching
allocator would; allocations above 32 MiB still pay their page faults on every call.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import ctypes
import ctypes.util

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from tropd_megatron.losses import (
    DenseKLConfig,
    EOPDConfig,
    OPDConfig,
    REOPOLDConfig,
    TeacherSignal,
    TrOPDConfig,
    distillation_loss,
)


class _GatherVocab(torch.autograd.Function):
    """The naive baseline's all-gather of the logits; its loss is replicated on every rank,
    so the backward just takes this rank's slice of the incoming gradient."""

    @staticmethod
    def forward(ctx, shard, group):
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), shard.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


def set_malloc(mmap_threshold: int, trim_threshold: int) -> None:
    """glibc mallopt (M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3); no-op elsewhere."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(-1, trim_threshold)
        libc.mallopt(-3, mmap_threshold)


class Memory:
    """Peak bytes allocated during a call, above what was allocated before it."""

    def __init__(self, device):
        self.device = device

    def _rss(self, key):
        return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def peak(self, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        base = self._rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        fn()
        return self._rss("VmHWM") - base


def collectives(fn):
    """(count, bytes) of the collectives one call issues on this rank (fp32 elements)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = [e for e in prof.events() if re.match(r"^(gloo|nccl):", e.name)]
    elements = 0
    for e in events:
        for shape in e.input_shapes[:1]:
            n = 1
            for d in shape:
                n *= d
            elements += n
    return len(events), 4 * elements


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768, help="full vocabulary (split over the ranks)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the logits")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--markdown", help="also write the table to this file (rank 0)")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.vocab % world:
        raise SystemExit(f"--vocab {args.vocab} must be divisible by the {world} ranks")
    local = args.vocab // world
    B, S = 1, args.tokens

    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    student = (torch.randn(B, S, local, generator=g) * 2).to(device, dtype)
    teacher = (student.float() * 0.5 + torch.randn(B, S, local, generator=g).to(device) * 2).to(dtype)
    del g
    torch.manual_seed(0)  # same targets on every rank
    target = torch.randint(0, args.vocab, (B, S), device=device)
    mask = torch.ones(B, S, device=device)
    signal = TeacherSignal.from_logits(teacher, target, topk=args.topk, tp_group=group)

    def ours(config, teacher_input=signal, inplace=False):
        def step(x):
            loss, n, _ = distillation_loss(x, teacher_input, target, mask, config, tp_group=group,
                                           inplace_backward=inplace)
            (loss / n).backward()
        return step

    def naive(config):
        def step(x):
            full = _GatherVocab.apply(x, group)
            loss, n, _ = distillation_loss(full, signal, target, mask, config)
            (loss / n).backward()
        return step

    rows = []
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)

        def megatron_ce(x):
            (vocab_parallel_cross_entropy(x, target) * mask).sum().div(mask.sum()).backward()

        rows.append(("Megatron vocab_parallel_cross_entropy", megatron_ce))
    except ImportError:
        if rank == 0:
            print("megatron-core not installed: no Megatron cross-entropy baseline", file=sys.stderr)
    tropd = TrOPDConfig(topk=args.topk)
    rows += [
        (f"naive all-gather, TrOPD fkl top-{args.topk}", naive(tropd)),
        ("OPD", ours(OPDConfig())),
        ("EOPD top-16", ours(EOPDConfig(topk=16))),
        ("REOPOLD", ours(REOPOLDConfig())),
        ("TrOPD clip", ours(TrOPDConfig(outlier="clip"))),
        ("TrOPD mask", ours(TrOPDConfig(outlier="mask"))),
        (f"TrOPD fkl top-{args.topk}", ours(tropd)),
        (f"TrOPD fkl top-{args.topk}, inplace_backward", ours(tropd, inplace=True)),
        ("dense reverse KL (teacher logits)", ours(DenseKLConfig("reverse"), teacher_input=teacher)),
    ]

    memory = Memory(device)

    def fresh():
        return student.clone().requires_grad_(True)  # the CE and in-place rows consume their input

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    measured = []
    set_malloc(64 << 10, 64 << 10)
    for name, step in rows:
        step(fresh())  # warm-up
        x = fresh()
        sync()
        peak = memory.peak(lambda x=x: step(x))
        x = fresh()
        measured.append((peak, *collectives(lambda x=x: step(x))))
        del x

    set_malloc(32 << 20, 1 << 30)
    results = []
    for (name, step), (peak, count, nbytes) in zip(rows, measured):
        step(fresh())  # warm-up under this allocator setting
        times = []
        for _ in range(args.iters):
            x = fresh()
            sync()
            t0 = time.perf_counter()
            step(x)
            sync()
            times.append(time.perf_counter() - t0)
        del x
        stats = torch.tensor([statistics.median(times), peak], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank, the largest peak
        results.append((name, stats[0].item(), stats[1].item(), count, nbytes))
        if rank == 0:
            print(f"  {name}: {1e3 * stats[0].item():.1f} ms", file=sys.stderr, flush=True)

    if rank == 0:
        report(results, args, world, device, dtype)
    dist.barrier()
    dist.destroy_process_group()


def report(results, args, world, device, dtype):
    base_t, base_m = results[0][1], results[0][2]
    shard_mib = args.tokens * args.vocab // world * torch.finfo(dtype).bits / 8 / 2**20
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores), gloo"
    lines = [
        f"TP={world}, {args.tokens} tokens, vocabulary {args.vocab} ({args.vocab // world} a shard), "
        f"{args.dtype} logits ({shard_mib:.0f} MiB a shard), {where}; median of {args.iters} forward+backward "
        f"calls, slowest rank; peak = memory above the inputs, largest rank; ratios against the first row.",
        "",
        "| loss | fwd+bwd ms | time ratio | peak MiB | memory ratio | collectives/call | collective KiB/call |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t, m, count, nbytes in results:
        lines.append(
            f"| {name} | {1e3 * t:.1f} | {t / base_t:.2f} | {m / 2**20:.1f} | "
            f"{m / base_m if base_m > 0 else float('nan'):.2f} | {count} | {nbytes / 1024:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

"""One training step (teacher pass + student forward / backward + optimizer) on padded vs
packed micro-batches of the same rollouts, in one run: tokens computed per real token, wall
time, peak memory, and their ratios.

    torchrun --nproc-per-node 1 bench/step.py [--rollouts 64] [--median 64] [--tail 8]

The rollouts have long-tailed lengths (log-normal response lengths, the longest ``--tail`` x
the median, the shape of reasoning traces) and random tokens; both layouts get the same
rollouts, objective (TrOPD, stochastic trust, top-k forward KL) and starting weights, and
give the same loss (checked). Padded: one rollout a row, every micro-batch padded to the
step's longest rollout (what pipeline schedules need without packing). Packed: rollouts
bin-packed into rows of the longest possible rollout (``rollout.row_tokens``' default).
Time: the median of ``--repeats`` steps after a warm-up step, the slowest rank. Peak memory:
on CPU the process's peak RSS above what it held before the step (VmHWM, reset before each
step), the largest rank; on GPU the CUDA allocator's peak.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time

import torch
import torch.distributed as dist
from mix import add_mix_arguments, add_model_arguments, publish, long_tailed_lengths


def reset_peak() -> int:
    """Start a new peak; returns the bytes held now."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _status("VmRSS")


def peak() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rollouts", type=int, default=64)
    add_mix_arguments(p, median=64)
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompts of half to this many tokens")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch, both layouts")
    add_model_arguments(p, vocab=2048)
    args = p.parse_args(argv)

    from tropd_megatron.losses import TrOPDConfig
    from tropd_megatron.megatron import ModelConfig, OptimConfig, ParallelConfig, build_gpt, build_student
    from tropd_megatron.megatron import initialize, train_step
    from tropd_megatron.megatron.rollout import Rollout, to_microbatches

    world = int(os.environ.get("WORLD_SIZE", 1))
    parallel = ParallelConfig(tensor=world)
    initialize(parallel, seed=args.seed)
    rng = random.Random(args.seed)
    responses = long_tailed_lengths(args.rollouts, args.median, args.tail, args.sigma, rng)
    rollouts = []
    for n in responses:
        prompt = [rng.randrange(1, args.vocab) for _ in range(rng.randint(args.prompt_tokens // 2, args.prompt_tokens))]
        continuation = [rng.randrange(1, args.vocab) for _ in range(n)]
        rollouts.append(Rollout(prompt, [], continuation, [-1.0] * n, False))
    row = args.prompt_tokens + max(responses) - 1
    config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_query_groups=4,
                         ffn_hidden_size=4 * args.hidden, vocab_size=args.vocab, max_sequence_length=row + 1,
                         dtype=args.dtype)
    teacher = build_gpt(config, parallel, frozen=True)
    student = build_student(config, parallel, OptimConfig(lr=1e-5), total_steps=100)
    initial = {k: v.detach().clone() for k, v in student.model.module.state_dict().items() if torch.is_tensor(v)}
    objective = TrOPDConfig(topk=16)
    real = sum(len(r.prompt) + len(r.continuation) - 1 for r in rollouts)
    loss_tokens = sum(responses)

    rows = []
    for name, pack in (("padded", False), ("packed", True)):
        batches = to_microbatches(rollouts, args.micro_batch, 0, pack=pack, row_tokens=row, same_shape=not pack)
        student.model.module.load_state_dict(initial, strict=False)
        seconds, peaks, result = [], [], None
        for repeat in range(args.repeats + 1):
            student.model.module.load_state_dict(initial, strict=False)  # every step from the same weights
            student.optimizer.reload_model_params()
            dist.barrier()
            before = reset_peak()
            start = time.perf_counter()
            result = train_step(student, teacher, batches, objective, vocab_size=args.vocab, step=1, total_steps=100)
            measured = torch.tensor([time.perf_counter() - start, peak() - before], dtype=torch.float64)
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)
            if repeat:  # the first step warms up
                seconds.append(float(measured[0]))
                peaks.append(float(measured[1]))
        computed = sum(mb.tokens.numel() for mb in batches)
        rows.append({"layout": name, "microbatches": len(batches), "computed": computed,
                     "per_real": computed / real, "per_loss": computed / loss_tokens,
                     "seconds": statistics.median(seconds), "peak": max(peaks), "loss": result.metrics["loss"]})
    padded, packed = rows
    # the same loss up to rounding: fp32 summation order, or bf16's 8 mantissa bits (and, on GPU,
    # THD attention kernels against padded ones)
    assert math.isclose(padded["loss"], packed["loss"], rel_tol=1e-4 if args.dtype == "fp32" else 2e-2), (
        padded["loss"], packed["loss"])

    if dist.get_rank() == 0:
        mix = (f"{args.rollouts} rollouts, response lengths median {statistics.median(responses):.0f}, mean "
               f"{statistics.fmean(responses):.1f}, max {max(responses)} tokens, prompts of "
               f"{args.prompt_tokens // 2}-{args.prompt_tokens}: {real} real tokens, {loss_tokens} loss tokens; "
               f"teacher and student {args.layers} x {args.hidden} {args.dtype}, vocabulary {args.vocab}, TP = {world}; "
               f"{args.micro_batch} rows a micro-batch, packed rows of {row} tokens")
        lines = [mix, "", "| layout | micro-batches | tokens computed | per real token | per loss token | step seconds "
                          "| peak memory (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['layout']} | {r['microbatches']} | {r['computed']} | {r['per_real']:.2f} | "
                         f"{r['per_loss']:.2f} | {r['seconds']:.2f} | {r['peak'] / 2**20:.0f} |")
        removed = padded["computed"] / packed["computed"]
        speedup = padded["seconds"] / packed["seconds"]
        lines.append(f"| padded / packed | | {removed:.2f}x | | | {speedup:.2f}x | {padded['peak'] / packed['peak']:.2f}x |")
        lines += ["", f"padding removed: {removed:.2f}x fewer tokens computed; step speed-up {speedup:.2f}x = "
                      f"{speedup / removed:.0%} of it; packed computes {packed['per_real']:.3f} tokens per real token"]
        publish(lines, args.markdown)
    dist.barrier()
    return rows


if __name__ == "__main__":
    main()

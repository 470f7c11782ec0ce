"""Rollout generation on Megatron's static vs dynamic inference engine, same model, prompts
and concurrency, in one run: generated tokens per second, model forward passes, peak KV
memory held, and the ratios.

    torchrun --nproc-per-node 1 bench/rollout.py [--requests 64] [--median 24] [--concurrency 16]

The response lengths are long-tailed, the shape of reasoning traces: log-normal, clipped at
``--tail`` x the median. They are forced rather than hoped for: the end token is a padded
vocabulary row the model never emits, and request i ends after exactly its length L_i. The
dynamic engine gets L_i as the request's budget (a sequence that stopped at its end token
frees its slot at once: the same compute as stopping there). The static engine runs batches of
``--concurrency`` requests in submission order, each to the longest L_i of its batch, and
counts only the L_i tokens of each request as generated: what it does when sequences of one
batch stop at their end tokens at different steps (they keep their slot until the batch's
longest is done). Both engines produce the same tokens (checked).

Time: the median of ``--repeats`` calls after a warm-up call, on the slowest rank.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.distributed as dist
from mix import add_mix_arguments, add_model_arguments, publish, long_tailed_lengths


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (builds the engine and its KV cache)
    seconds, result = [], None
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        result = fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds.append(float(elapsed))
    return statistics.median(seconds), result


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    add_mix_arguments(p, median=24)
    p.add_argument("--concurrency", type=int, default=16, help="sequences generated at once, both engines")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--block", type=int, default=256, help="the dynamic engine's KV block size (tokens)")
    add_model_arguments(p, vocab=512)
    args = p.parse_args(argv)

    from tropd_megatron.megatron import ModelConfig, ParallelConfig, build_gpt, initialize
    from tropd_megatron.megatron.inference import EngineConfig, Generator, SamplingConfig

    tp = int(os.environ.get("WORLD_SIZE", 1))
    parallel = ParallelConfig(tensor=tp)
    initialize(parallel, seed=args.seed)
    budgets = long_tailed_lengths(args.requests, args.median, args.tail, args.sigma, random.Random(args.seed))
    rng = random.Random(args.seed + 1)
    prompts = [[rng.randrange(args.vocab) for _ in range(rng.randint(args.prompt_tokens // 2, args.prompt_tokens))]
               for _ in range(args.requests)]
    longest = args.prompt_tokens + max(budgets)
    config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_query_groups=4,
                         ffn_hidden_size=4 * args.hidden, vocab_size=args.vocab, padded_vocab_size=args.vocab + 64,
                         max_sequence_length=longest, dtype=args.dtype)
    never = args.vocab  # a padded row: -inf logits, never generated, so nothing ends early
    model = build_gpt(config, parallel, frozen=True)
    greedy = SamplingConfig(top_k=1)
    useful = sum(budgets)

    def static_run(gen):
        tokens, forwards, kv = [], 0, 0
        for start in range(0, len(prompts), args.concurrency):
            batch = slice(start, start + args.concurrency)
            outs = gen.generate(prompts[batch], SamplingConfig(top_k=1, max_new_tokens=max(budgets[batch])))
            tokens += [o.tokens[:b] for o, b in zip(outs, budgets[batch])]
            forwards, kv = forwards + gen.stats.forward_passes, max(kv, gen.stats.kv_bytes)
        return tokens, forwards, kv

    def dynamic_run(gen):
        outs = gen.generate(prompts, greedy, max_new_tokens=budgets)
        return [o.tokens for o in outs], gen.stats.forward_passes, gen.stats.kv_bytes

    rows = []
    for name, run in (("static", static_run), ("dynamic", dynamic_run)):
        engine = EngineConfig(name, max_requests=args.concurrency, block_size_tokens=args.block,
                              kv_cache_gib=64.0)  # capped at what the requests can use
        gen = Generator(model, config, eos_id=never, engine=engine, max_request_tokens=longest, name=name)
        seconds, (tokens, forwards, kv) = timed(lambda: run(gen), args.repeats)
        rows.append({"engine": name, "seconds": seconds, "tokens": sum(map(len, tokens)),
                     "tokens_per_second": useful / seconds, "forward_passes": forwards, "kv_bytes": kv,
                     "outputs": tokens})
    static, dynamic = rows
    assert static["tokens"] == dynamic["tokens"] == useful
    # greedy agreement: requests whose tokens are the same from both engines, and the share of
    # tokens before the first difference. Exact only where both run the same kernels (CPU,
    # fp32); on GPU the dynamic engine's flash-attn and the static engine's attention round
    # differently, and bf16 near-ties then flip a token and everything after it
    same = [a == b for a, b in zip(static["outputs"], dynamic["outputs"])]
    common = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                 for a, b in zip(static["outputs"], dynamic["outputs"]))
    agreement = {"requests": sum(same) / len(same), "tokens": common / useful}
    if not torch.cuda.is_available() and args.dtype == "fp32":
        assert all(same), f"the engines generated different tokens (agreement {agreement})"

    if dist.get_rank() == 0:
        mix = (f"{args.requests} requests, response lengths median {statistics.median(budgets):.0f}, mean "
               f"{statistics.fmean(budgets):.1f}, max {max(budgets)} tokens ({useful} in all), prompts of "
               f"{args.prompt_tokens // 2}-{args.prompt_tokens}; {args.concurrency} at a time; model "
               f"{args.layers} x {args.hidden} {args.dtype}, vocabulary {args.vocab}, TP = {tp}; KV blocks of "
               f"{args.block} tokens")
        lines = [mix, "", "| engine | seconds | generated tokens / s | forward passes | peak KV memory (MiB) |",
                 "|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['engine']} | {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | {r['forward_passes']} "
                         f"| {r['kv_bytes'] / 2**20:.2f} |")
        lines.insert(1, f"greedy agreement between the engines: {agreement['requests']:.1%} of requests identical, "
                        f"{agreement['tokens']:.1%} of tokens before a request's first difference")
        lines.append(f"| dynamic / static | {dynamic['seconds'] / static['seconds']:.2f}x | "
                     f"{dynamic['tokens_per_second'] / static['tokens_per_second']:.2f}x | "
                     f"{dynamic['forward_passes'] / static['forward_passes']:.2f}x | "
                     f"{dynamic['kv_bytes'] / static['kv_bytes']:.2f}x |")
        publish(lines, args.markdown)
    dist.barrier()
    return rows


if __name__ == "__main__":
    main()

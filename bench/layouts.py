"""One full training iteration (rollouts -> teacher signal -> student step -> optimizer) with
the teacher at TP = world and the student either on the teacher's layout (TP = world, what a
run without ``teacher.parallel`` does) or on its own (TP = 1 x DP = world), in one run: each
phase's time, rollout tokens per second and the step-time ratio.

    python bench/layouts.py [--world 4] [--prompts 16] [--max-new-tokens 32]

Both layouts get the same models (random weights from one seed), the same prompts per step
(split over the student's data-parallel ranks), the same budgets and sampling settings (every
rollout runs to its budget: the same token counts), TrOPD with teacher prefixes on a quarter
of the rollouts. Each layout runs in its own torchrun
launch (Megatron's global groups are set once per process); time is the median of
``--repeats`` iterations after a warm-up one, the slowest rank.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("rollout", "teacher", "student", "optimizer", "total")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(HERE))
    from tropd_megatron.data import PromptDataConfig, PromptStream
    from tropd_megatron.losses import TrOPDConfig
    from tropd_megatron.megatron import ModelConfig, OptimConfig, ParallelConfig, build_gpt, build_student, initialize
    from tropd_megatron.megatron.groups import ModelGroups
    from tropd_megatron.megatron.inference import EngineConfig, Generator, SamplingConfig
    from tropd_megatron.megatron.iteration import IterationSettings, run_iteration
    from tropd_megatron.megatron.rollout import RolloutConfig
    from tropd_megatron.megatron.teacher_layout import LayoutGenerator, LayoutTeacher, TeacherLayout, teacher_groups

    world = int(os.environ["WORLD_SIZE"])
    student_parallel, teacher_parallel = ParallelConfig(args.student_tensor), ParallelConfig(world)
    initialize(student_parallel, seed=0)
    # the end token is a padded (-inf) row: never sampled, so every rollout runs to its budget
    # and both layouts do the same work
    vocab, end, length = 511, 511, args.prompt_tokens + args.max_new_tokens
    shapes = dict(num_attention_heads=8, vocab_size=vocab, padded_vocab_size=512, max_sequence_length=length)
    teacher_config = ModelConfig(num_layers=args.teacher_layers, hidden_size=args.teacher_hidden,
                                 ffn_hidden_size=4 * args.teacher_hidden, **shapes)
    student_config = ModelConfig(num_layers=args.student_layers, hidden_size=args.student_hidden,
                                 ffn_hidden_size=4 * args.student_hidden, **shapes)
    groups = teacher_groups(student_parallel, teacher_parallel)
    teacher = build_gpt(teacher_config, teacher_parallel, frozen=True, groups=groups)
    student = build_student(student_config, student_parallel, OptimConfig(lr=1e-5), total_steps=100)
    engine = EngineConfig(max_requests=args.prompts * 4, kv_cache_gib=0.25, block_size_tokens=64)
    student_gen = Generator(student.model.module, student_config, eos_id=end, engine=engine, name="student")
    teacher_gen = Generator(teacher, teacher_config, eos_id=end, engine=engine, name="teacher")
    if groups is not None:
        layout = TeacherLayout(ModelGroups.megatron(), groups)
        teacher, teacher_gen = LayoutTeacher(teacher, layout), LayoutGenerator(teacher_gen, layout)
    with open(args.prompts_file) as f:
        lines = f.read().splitlines()
    encode = lambda text: [ord(c) % vocab for c in text]  # noqa: E731
    prompts = PromptStream(PromptDataConfig(args.prompts_file, max_prompt_tokens=args.prompt_tokens), encode)
    rollout = RolloutConfig(SamplingConfig(max_new_tokens=args.max_new_tokens), engine=engine, rollouts_per_prompt=4,
                            micro_batch_size=4, prefix_share_start=0.25, prefix_share_end=0.25,
                            prefix_tokens_start=args.prefix_tokens, prefix_tokens_end=args.prefix_tokens)
    settings = IterationSettings(rollout, TrOPDConfig(topk=16), args.prompts, vocab, total_steps=100)
    seconds, speeds = [], []
    for step in range(args.repeats + 1):
        dist.barrier()
        result = run_iteration(student, teacher, student_gen, teacher_gen, prompts, settings, step)
        times = torch.tensor([result.seconds[p] for p in PHASES], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        tokens = torch.tensor([result.metrics["response_tokens"] if ModelGroups.megatron().tp_rank == 0 else 0],
                              dtype=torch.float64)
        dist.all_reduce(tokens)  # every student data-parallel rank's rollouts, once
        if step:
            seconds.append(dict(zip(PHASES, times.tolist())))
            speeds.append(float(tokens) / seconds[-1]["rollout"])
    if dist.get_rank() == 0:
        out = {p: statistics.median(s[p] for s in seconds) for p in PHASES}
        out.update(rollout_tokens_per_second=statistics.median(speeds), prompts=len(lines))
        with open(args.out, "w") as f:
            json.dump(out, f)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--prompts", type=int, default=16, help="prompts a step (4 rollouts each), over all ranks")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=8, help="teacher prefix length (a quarter of the rollouts)")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--student-tensor", type=int, help=argparse.SUPPRESS)  # a worker launch
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)
    if args.student_tensor is not None:
        worker(args)
        return []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            for i in range(4 * args.prompts):
                f.write(json.dumps({"prompt": f"{i} + {i * 7 % 13} ="}) + "\n")
        for name, tensor in (("student on the teacher's layout", args.world), ("student on its own layout", 1)):
            out = os.path.join(tmp, f"tp{tensor}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.world), "--master-port",
                   str(_free_port()),
                   os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--student-tensor", str(tensor), "--prompts-file", prompts, "--out", out]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            with open(out) as f:
                results[(name, tensor)] = json.load(f)
    same, own = results.values()
    w = args.world
    lines = [f"{w} processes; teacher {args.teacher_layers} x {args.teacher_hidden} at TP {w}, student "
             f"{args.student_layers} x {args.student_hidden}; {args.prompts} prompts x 4 rollouts a step, up to "
             f"{args.max_new_tokens} new tokens, teacher prefixes of {args.prefix_tokens} tokens on a quarter; "
             f"median of {args.repeats}",
             "", "| student layout | rollout s | teacher s | student s | optimizer s | step s | rollout tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (name, tensor), r in results.items():
        layout = f"TP {tensor} x DP {w // tensor}"
        lines.append(f"| {layout} ({name}) | " + " | ".join(f"{r[p]:.3f}" for p in PHASES)
                     + f" | {r['rollout_tokens_per_second']:.0f} |")
    speed = own["rollout_tokens_per_second"] / same["rollout_tokens_per_second"]
    lines += ["", f"step time, TP {w} / TP 1 x DP {w}: {same['total'] / own['total']:.2f}x; rollout tokens/s, "
                  f"TP 1 x DP {w} / TP {w}: {speed:.2f}x"]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return lines


if __name__ == "__main__":
    main()

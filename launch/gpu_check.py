"""What a first GPU run shows, in one command and one report: `make gpu-check`.

    python -m launch.gpu_check [--out runs/gpu/gpu-check.md] [--dry-run]

Steps, each in its own process with its own time limit (about 10 minutes in all on one H200):
1. the machine: device, torch / CUDA / megatron-core versions, what was detected
   (TransformerEngine, flash-attn, FA3) and what the pinned stack (gpu-requirements.txt) lacks;
2. ``tests/megatron/test_gpu.py`` with TF32 off (TE runs fp32 GEMMs in TF32 whatever torch says);
3. ``bench/rollout.py`` in bf16: both engines' speed and their greedy agreement;
4. ``bench/step.py`` in bf16: packed vs padded micro-batches (time, memory, the same loss);
5. two training iterations of the tiny recipe in bf16 (random weights): each phase's time, the
   rollout / training log-prob mismatch (``rollout_log_ratio_abs``, ``rollout_log_ratio_p99``,
   ``rollout_clip_fraction``), the KV bytes in use and the allocator's peak from
   metrics.jsonl, beside the planner's figures for the same configuration.
``--dry-run`` (on CPU) runs step 1 and the harness, and reports every GPU-only step as skipped
with the reason. Exit 1 when a step failed or timed out (or, without --dry-run, there is no GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Step:
    name: str
    command: list  # run from the repository root
    limit_s: int
    env: dict | None = None
    summary: object = None  # a function of the step's folder -> markdown lines
    prepare: list | None = None  # a command run first, inside the step's time limit


def run_step(step: Step, folder: str) -> tuple[str, float, str]:
    """(status, seconds, output tail) of one step."""
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(step.env or {})}
    try:
        for command in ([step.prepare] if step.prepare else []) + [step.command]:
            left = step.limit_s - (time.perf_counter() - started)
            out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(left, 1), env=env)
            status = "ok" if out.returncode == 0 else f"failed (exit {out.returncode})"
            tail = (out.stdout + out.stderr)[-3000:]
            if out.returncode:
                break
    except subprocess.TimeoutExpired as e:
        status, tail = f"timed out after {step.limit_s} s", str(e.stdout or "")[-3000:]
    return status, time.perf_counter() - started, tail


def machine_lines() -> list[str]:
    import importlib.metadata

    import torch

    from tropd_megatron.platform import GPU_REQUIREMENTS, Platform, gpu_stack_problems

    platform = Platform.detect()
    version = lambda v: ".".join(map(str, v)) if v else "not installed"  # noqa: E731
    lines = [f"- device: {torch.cuda.get_device_name(0) if platform.cuda else 'no CUDA GPU'}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core "
             f"{importlib.metadata.version('megatron-core')}",
             f"- TransformerEngine: {version(platform.transformer_engine)}; flash-attn: {version(platform.flash_attn)}; "
             f"FA3: {'yes' if platform.flash_attn_3 else 'no'}"]
    if problem := platform.dynamic_engine_problem():
        lines.append(f"- dynamic engine: {problem}")
    missing = gpu_stack_problems(os.path.join(ROOT, GPU_REQUIREMENTS), platform)
    lines.append("- pinned stack (gpu-requirements.txt): " + ("present" if not missing else "; ".join(missing)))
    return lines


def training_summary(folder: str, overrides: list | None = None) -> list[str]:
    """The run's metrics by step; with the run's ``overrides`` of the tiny recipe, the planner's
    figures for it."""
    from tropd_megatron.logs import read_metrics

    nan = float("nan")
    rows = ["| step | rollout s | teacher s | student s | optimizer s | |log rho| | p99 | clip fraction | KV MiB | "
            "peak GiB | tokens/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for step, m in read_metrics(os.path.join(folder, "run")).items():
        s = m["seconds"]
        rows.append(f"| {step} | {s['rollout']:.2f} | {s['teacher']:.2f} | {s['student']:.2f} | {s['optimizer']:.2f} | "
                    f"{m.get('rollout_log_ratio_abs', nan):.2e} | {m.get('rollout_log_ratio_p99', nan):.2e} | "
                    f"{m.get('rollout_clip_fraction', nan):.3f} | {m.get('kv_bytes', nan) / 2**20:.1f} | "
                    f"{m.get('memory_peak_gib', nan):.2f} | {m['tokens_per_second']:.0f} |")
    if overrides is not None:
        from recipes import get_recipe
        from tropd_megatron.planner import GIB, plan

        memory = plan(get_recipe("tiny", overrides), 1)
        kv = sum(v for k, v in memory.items.items() if "KV cache" in k)
        rows += ["", f"planner, per GPU: rollouts {memory.phase_total('rollouts') / GIB:.2f} GiB, training "
                     f"{memory.phase_total('training') / GIB:.2f} GiB (without its {memory.gpu} context allowance), "
                     f"KV caches {kv / 2**20:.1f} MiB"]
    return rows


def table_of(name: str):
    def read(folder: str) -> list[str]:
        path = os.path.join(folder, name)
        return open(path).read().splitlines() if os.path.exists(path) else []
    return read


def steps(folder: str) -> list[Step]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    task = os.path.join(folder, "task")
    tiny = [f"tokenizer={task}/tokenizer.model", f"data.path={task}/prompts.jsonl", "eval.path=null",
            "teacher.checkpoint=null", "student.checkpoint=null", f"checkpoint.dir={folder}/run",
            "logging.tensorboard_dir=null", "parallel.tensor=1", "schedule.steps=2", "schedule.prompts_per_step=8",
            "student.model.dtype=bf16", "teacher.model.dtype=bf16", "rollout.engine.kv_cache_gib=1"]
    prepare = ("from recipes.tiny import TEMPLATE; from tropd_megatron.tasks.tiny_task import TinyTaskConfig, "
               f"training_split, write_task_files; c = TinyTaskConfig(); write_task_files({task!r}, c, TEMPLATE, "
               "training_split(c))")
    return [
        Step("tests/megatron/test_gpu.py (TF32 off)", [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu",
                                              "tests/megatron/test_gpu.py"], 240, {"NVIDIA_TF32_OVERRIDE": "0"}),
        Step("bench/rollout.py, bf16", torchrun + ["bench/rollout.py", "--dtype", "bf16", "--layers", "8", "--hidden",
                                                   "1024", "--median", "256", "--prompt-tokens", "256",
                                                   "--markdown", f"{folder}/rollout.md"], 120,
             summary=table_of("rollout.md")),
        Step("bench/step.py, bf16", torchrun + ["bench/step.py", "--dtype", "bf16", "--layers", "8", "--hidden", "1024",
                                                "--markdown", f"{folder}/step.md"], 120, summary=table_of("step.md")),
        Step("two iterations of the tiny recipe, bf16", torchrun + ["-m", "launch.train", "--recipe", "tiny", *tiny],
             240, summary=lambda f: training_summary(f, tiny), prepare=[sys.executable, "-c", prepare]),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu/gpu-check.md", help="the markdown report")
    parser.add_argument("--dry-run", action="store_true", help="run the harness; skip every GPU-only step")
    args = parser.parse_args(argv)
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    lines = ["# GPU check", "", f"`python -m launch.gpu_check{' --dry-run' if args.dry_run else ''}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", "## 1. The machine", ""] + machine_lines()
    skip = "--dry-run" if args.dry_run else ("no CUDA GPU" if not torch.cuda.is_available() else None)
    failed = skip is not None and not args.dry_run
    with tempfile.TemporaryDirectory() as folder:
        results = []
        for number, step in enumerate(steps(folder), 2):
            lines += ["", f"## {number}. {step.name}", ""]
            if skip:
                lines.append(f"skipped: {skip} (needs a CUDA GPU)")
                results.append("skipped")
                continue
            status, seconds, tail = run_step(step, folder)
            print(f"gpu-check: {step.name}: {status} ({seconds:.0f} s)", file=sys.stderr, flush=True)
            lines.append(f"{status}, {seconds:.0f} s")
            if status == "ok" and step.summary is not None:
                lines += [""] + step.summary(folder)
            elif status != "ok":
                lines += ["", "```", tail.strip(), "```"]
                failed = True
            results.append(status)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"gpu-check: report in {args.out}" + (f" ({json.dumps(results)})" if results else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

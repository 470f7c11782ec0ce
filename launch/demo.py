"""`make demo`: TrOPD on the built-in arithmetic task, on CPU at TP = 2 under torchrun.

    torchrun --nproc-per-node 2 -m launch.demo [--root runs/demo] [key=value ...]

Phases: task files and a sentencepiece tokenizer -> a 4-layer teacher trained by supervised
fine-tuning -> a 2-layer student fine-tuned briefly (both cached under runs/demo) -> the tiny
recipe's TrOPD run (held-out avg@1 before, during and after; checkpoints in runs/demo/tropd,
resumed when interrupted) -> a summary table, runs/demo/summary.json and runs/demo/demo.png.
The summary gives the student's last evaluation and the mean of the last ``LAST_EVALS``, and
compares the default demo's figures with the band that runs on other CPUs and seeds gave.
"""
import argparse
import json
import os
import sys
import time

import torch.distributed as dist
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch import run_main
from recipes.tiny import tiny
from tropd_megatron.run_config import apply_overrides, leaf_keys
from tropd_megatron.evaluation.avg_at_n import evaluate
from tropd_megatron.megatron import initialize
from tropd_megatron.megatron.inference import Generator
from tropd_megatron.tasks.tiny_task import TinyTaskConfig, prepare
from tropd_megatron.logs import logging_rank, read_metrics
from tropd_megatron.train import Trainer
from tropd_megatron import ConfigError

# The student's end figure is the mean of the last evaluations as well as the last one: the
# held-out curve moves by a few points between evaluations (0.318 at step 175, 0.270 at 200).
LAST_EVALS = 3
# What `make demo` without overrides gave across CPU models, kernel pins and seeds (the runs
# are listed in docs/results.md): float rounding differs by CPU, rollouts are sampled, and a
# last-bit difference sends a run down another path of the same quality.
EXPECTED = {"teacher_accuracy": (0.64, 0.78), "student_accuracy_last_mean": (0.24, 0.38)}


def band_lines(summary: dict, overridden: bool) -> list[str]:
    """A line per figure of ``EXPECTED``: its value against the band runs elsewhere gave."""
    if overridden:
        return ["expected band: not compared (the recipe or the task was overridden; docs/results.md has the "
                "default's band)"]
    lines = []
    for key, (low, high) in EXPECTED.items():
        where = "inside" if low <= summary[key] <= high else "OUTSIDE"
        lines.append(f"expected band: {key} {summary[key]:.3f} is {where} {low:.2f}-{high:.2f} "
                     "(runs on other CPUs and seeds, docs/results.md)")
    return lines


def plot(cfg, evals: list, path: str) -> None:
    """Loss and trust fraction by step (the run's metrics.jsonl) and held-out accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(cfg.checkpoint.dir)
    curves = [(list(metrics), [m["loss"] for m in metrics.values()], "TrOPD loss"),
              (list(metrics), [m.get("trust_fraction") for m in metrics.values()], "trust fraction"),
              ([e["step"] for e in evals], [e["avg_at_n"] for e in evals], "held-out accuracy (avg@1)")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (steps, values, title) in zip(axes, curves):
        ax.plot(steps, values, marker="o" if title.startswith("held-out") else None)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tiny_configs(root: str, overrides: list) -> tuple:
    """(RunConfig, TinyTaskConfig): the tiny recipe at ``root`` with ``overrides``, where
    ``task.*`` keys go to the task preparation; ValueError naming a bad key."""
    task = [o[len("task."):] for o in overrides if o.startswith("task.")]
    cfg = apply_overrides(tiny(root), [o for o in overrides if not o.startswith("task.")])
    try:
        task_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TinyTaskConfig()),
                                                       OmegaConf.from_dotlist(task)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"task setting rejected: task.{e.full_key}: {str(e.msg).splitlines()[0]}") from None
    return cfg, task_cfg


TASK_HELP = ("tiny recipe overrides (schedule.steps=50) or task.* preparation settings "
             f"({', '.join('task.' + k for k in leaf_keys(TinyTaskConfig()))})")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo", help="where the task files, models and run go")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=TASK_HELP)
    args = parser.parse_args(argv)
    try:
        return (*tiny_configs(args.root, args.overrides), bool(args.overrides))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


def main(argv=None) -> dict:
    cfg, task_cfg, overridden = parse(argv)
    start = time.time()
    initialize(cfg.parallel, seed=cfg.schedule.seed)
    prepare(cfg, task_cfg)
    trainer = Trainer(cfg)
    teacher_generator = Generator(trainer.teacher, trainer.teacher_generator.config, eos_id=trainer.tokenizer.eos_id,
                                  engine=cfg.rollout.engine, name="teacher",
                                  max_request_tokens=cfg.data.max_prompt_tokens + cfg.eval_max_new_tokens())
    teacher = evaluate(teacher_generator, trainer.eval_problems, trainer.tokenizer.decode,
                       max_new_tokens=cfg.eval_max_new_tokens(), progress=False)
    del teacher_generator  # its KV cache
    result = trainer.run()
    evals = result.eval
    metrics = read_metrics(cfg.checkpoint.dir).values() if logging_rank() else []
    trust = [m["trust_fraction"] for m in metrics if "trust_fraction" in m]  # TrOPD only
    last = evals[-LAST_EVALS:]
    summary = {"teacher_accuracy": teacher.avg_at_n, "student_accuracy_before": evals[0]["avg_at_n"],
               "student_accuracy_after": evals[-1]["avg_at_n"],
               "student_accuracy_last_mean": sum(e["avg_at_n"] for e in last) / len(last),
               "last_eval_steps": [e["step"] for e in last], "eval_problems": teacher.problems,
               "trust_fraction": sum(trust) / max(len(trust), 1), "steps": trainer.step,
               "objective": cfg.objective.name, "wall_seconds": time.time() - start}
    if logging_rank():
        root = os.path.dirname(cfg.tokenizer)
        plot(cfg, evals, os.path.join(root, "demo.png"))
        with open(os.path.join(root, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        t, s = cfg.teacher.model, cfg.student.model
        print(f"\n| held-out accuracy ({teacher.problems} problems, greedy) | value |\n|---|---:|\n"
              f"| teacher ({t.num_layers} layers x {t.hidden_size}) | {teacher.avg_at_n:.3f} |\n"
              f"| student ({s.num_layers} layers x {s.hidden_size}) before {cfg.objective.name} | "
              f"{summary['student_accuracy_before']:.3f} |\n"
              f"| student after {trainer.step} {cfg.objective.name} steps | {summary['student_accuracy_after']:.3f} |\n"
              f"| student, mean of the evaluations at steps {', '.join(map(str, summary['last_eval_steps']))} | "
              f"{summary['student_accuracy_last_mean']:.3f} |\n"
              f"| mean trust fraction | {summary['trust_fraction']:.3f} |\n"
              f"| wall time (s) | {summary['wall_seconds']:.0f} |\n"
              + "\n".join(band_lines(summary, overridden)) + "\n"
              f"plot: {root}/demo.png, TensorBoard: tensorboard --logdir {cfg.logging.tensorboard_dir}", flush=True)
    dist.barrier()
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main))

"""`make demo`: TrOPD on the built-in arithmetic task, on CPU at TP = 2 under torchrun.

    torchrun --nproc-per-node 2 -m tropd_megatron.demo [--out runs/demo] [--tropd-steps 40]

Phases: task data and a sentencepiece tokenizer -> a teacher trained by supervised
fine-tuning (cached in OUT/teacher) -> a smaller student briefly fine-tuned so it knows the
format but not the arithmetic (cached in OUT/student_init) -> held-out accuracy before ->
TrOPD (student rollouts, teacher signal, sharded loss) -> accuracy after, a summary table,
TensorBoard logs in OUT/tensorboard and a plot in OUT/demo.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from .data import PromptDataConfig, PromptStream
from .losses import SFTConfig, TrOPDConfig
from .megatron import ModelConfig, OptimConfig, ParallelConfig, build_gpt, build_student, initialize, train_step
from .megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .megatron.inference import Generator, SamplingConfig
from .megatron.iteration import run_iteration
from .megatron.rollout import Rollout, RolloutConfig, to_microbatches
from .tasks.arithmetic import ArithmeticConfig, is_correct, make_split
from .tokenizer import SentencePieceTokenizer

TEMPLATE = "Q: {prompt} A:"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    task: ArithmeticConfig = field(default_factory=lambda: ArithmeticConfig(2, 2, max_operand=9, max_multiplier=5))
    train_problems: int = 3000  # of ~4,400 distinct problems with the default task
    eval_problems: int = 400
    vocab_size: int = 64  # requested; sentencepiece may stop below it
    teacher_layers: int = 4
    teacher_hidden: int = 128
    student_layers: int = 2
    student_hidden: int = 64
    sft_batch: int = 64
    sft_lr: float = 3e-3
    teacher_sft_steps: int = 300
    student_sft_steps: int = 150
    tropd_steps: int = 200
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 4
    tropd_lr: float = 1e-3
    max_new_tokens: int = 40
    eval_every: int = 25


def model_config(layers: int, hidden: int, vocab: int) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=4 * hidden,
                       vocab_size=vocab, padded_vocab_size=64, max_sequence_length=64)


def is_printer() -> bool:
    return dist.get_rank() == 0


def say(message: str) -> None:
    if is_printer():
        print(message, file=sys.stderr, flush=True)


def prepare(cfg: DemoConfig):
    train = make_split(cfg.train_problems, cfg.seed, cfg.task)
    held_out = make_split(cfg.eval_problems, cfg.seed + 1, cfg.task, frozenset(p.question for p in train))
    tok_path = os.path.join(cfg.out, "tokenizer.model")
    prompts_path = os.path.join(cfg.out, "prompts.jsonl")
    if is_printer() and not os.path.exists(tok_path):  # the tokenizer, written last, marks a finished prepare
        with open(prompts_path + ".tmp", "w") as f:
            for p in train:
                f.write(json.dumps({"prompt": p.question, "answer": p.answer}) + "\n")
        os.replace(prompts_path + ".tmp", prompts_path)
        SentencePieceTokenizer.train([f"{TEMPLATE.format(prompt=p.question)} {p.solution}" for p in train], tok_path,
                                     cfg.vocab_size)
    dist.barrier()
    return train, held_out, SentencePieceTokenizer(tok_path), prompts_path


def supervised(student, train, tok, cfg: DemoConfig, steps: int, what: str) -> None:
    rng = random.Random(cfg.seed + steps)
    bar = tqdm(range(steps), desc=f"SFT {what}", disable=not is_printer(), file=sys.stderr)
    for step in bar:
        rollouts = []
        for p in rng.sample(train, cfg.sft_batch):
            answer = tok.encode(" " + p.solution) + [tok.eos_id]
            rollouts.append(Rollout(tok.encode(TEMPLATE.format(prompt=p.question)), [], answer, [0.0] * len(answer), True))
        result = train_step(student, None, to_microbatches(rollouts, cfg.sft_batch, tok.eos_id), SFTConfig(),
                            vocab_size=tok.vocab_size, step=step, total_steps=steps)
        if result.metrics:
            bar.set_postfix(loss=f"{result.metrics['loss']:.3f}")


def accuracy(generator: Generator, problems, tok, cfg: DemoConfig) -> float:
    outs = generator.generate([tok.encode(TEMPLATE.format(prompt=p.question)) for p in problems],
                              SamplingConfig(top_k=1, max_new_tokens=cfg.max_new_tokens))
    return sum(is_correct(tok.decode(o.tokens), p) for o, p in zip(outs, problems)) / len(problems)


def trained_model(name: str, model_cfg: ModelConfig, parallel, train, tok, cfg: DemoConfig, steps: int):
    """A model fine-tuned for ``steps``, from OUT/name when an earlier run saved it."""
    path = os.path.join(cfg.out, name)
    optim = OptimConfig(lr=cfg.sft_lr, warmup_steps=min(20, steps // 5), min_lr=1e-4)
    student = build_student(model_cfg, parallel, optim, steps)
    wanted = {"model": asdict(model_cfg), "sft_steps": steps, "task": asdict(cfg.task),
              "train_problems": cfg.train_problems, "seed": cfg.seed}
    cached = latest_checkpoint(path)
    if cached is not None:
        saved = json.loads((cached / "trainer.json").read_text())["trainer"]
        if saved != wanted:
            raise SystemExit(f"{path} holds a {name} trained with {saved}, not {wanted}: delete {path} to retrain it")
        say(f"{name}: loaded from {path}")
        load_checkpoint(cached, student.model.module)
    else:
        supervised(student, train, tok, cfg, steps, name)
        save_checkpoint(path, steps, student.model.module, trainer_state=wanted)
    return student


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoConfig()
    for key, value in asdict(defaults).items():
        if isinstance(value, (int, float, str)):
            parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    cfg = DemoConfig(**args)
    start = time.time()
    parallel = ParallelConfig(tensor=2, pipeline=1)
    initialize(parallel, seed=cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    train, held_out, tok, prompts_path = prepare(cfg)
    teacher_cfg = model_config(cfg.teacher_layers, cfg.teacher_hidden, tok.vocab_size)
    student_cfg = model_config(cfg.student_layers, cfg.student_hidden, tok.vocab_size)

    trained_model("teacher", teacher_cfg, parallel, train, tok, cfg, cfg.teacher_sft_steps)
    teacher = build_gpt(teacher_cfg, parallel, frozen=True)
    load_checkpoint(latest_checkpoint(os.path.join(cfg.out, "teacher")), teacher)
    init = trained_model("student_init", student_cfg, parallel, train, tok, cfg, cfg.student_sft_steps)
    student = build_student(student_cfg, parallel, OptimConfig(lr=cfg.tropd_lr, warmup_steps=0, min_lr=cfg.tropd_lr / 10),
                            cfg.tropd_steps)
    load_checkpoint(latest_checkpoint(os.path.join(cfg.out, "student_init")), student.model.module)
    del init

    teacher_gen = Generator(teacher, teacher_cfg, eos_id=tok.eos_id, max_batch_size=64)
    student_gen = Generator(student.model.module, student_cfg, eos_id=tok.eos_id, max_batch_size=64)
    teacher_acc = accuracy(teacher_gen, held_out, tok, cfg)
    before = accuracy(student_gen, held_out, tok, cfg)
    say(f"held-out accuracy: teacher {teacher_acc:.3f}, student before TrOPD {before:.3f}")

    writer = None
    if is_printer():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
    prompts = PromptStream(PromptDataConfig(prompts_path, chat_template=TEMPLATE, max_prompt_tokens=32, seed=cfg.seed),
                           tok.encode)
    rollout = RolloutConfig(SamplingConfig(max_new_tokens=cfg.max_new_tokens), rollouts_per_prompt=cfg.rollouts_per_prompt,
                            micro_batch_size=cfg.prompts_per_step * cfg.rollouts_per_prompt // 2)
    objective = TrOPDConfig(topk=16, seed=cfg.seed)
    history = {"step": [], "loss": [], "trust_fraction": [], "accuracy_step": [0], "accuracy": [before]}
    bar = tqdm(range(cfg.tropd_steps), desc="TrOPD", disable=not is_printer(), file=sys.stderr)
    for step in bar:
        result = run_iteration(student, teacher, student_gen, teacher_gen, prompts, rollout, objective,
                               prompts_per_step=cfg.prompts_per_step, vocab_size=tok.vocab_size, step=step,
                               total_steps=cfg.tropd_steps, seed=cfg.seed, log=False)
        m = result.metrics
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.tropd_steps:
            history["accuracy_step"].append(step + 1)
            history["accuracy"].append(accuracy(student_gen, held_out, tok, cfg))
        if writer is not None and "loss" in m:
            history["step"].append(step + 1)
            history["loss"].append(m["loss"])
            history["trust_fraction"].append(m["trust_fraction"])
            for key in ("loss", "trust_fraction", "kl_k3", "response_length", "tokens_per_second"):
                writer.add_scalar(f"tropd/{key}", m[key], step + 1)
            writer.add_scalar("eval/accuracy", history["accuracy"][-1], history["accuracy_step"][-1])
            bar.set_postfix(loss=f"{m['loss']:.3f}", trust=f"{m['trust_fraction']:.2f}",
                            acc=f"{history['accuracy'][-1]:.2f}")
    after = history["accuracy"][-1]
    summary = {"teacher_accuracy": teacher_acc, "student_accuracy_before": before, "student_accuracy_after": after,
               "trust_fraction": sum(history["trust_fraction"]) / max(len(history["trust_fraction"]), 1),
               "tropd_steps": cfg.tropd_steps, "wall_seconds": time.time() - start}
    if is_printer():
        writer.close()
        plot(history, os.path.join(cfg.out, "demo.png"))
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"\n| held-out accuracy ({cfg.eval_problems} problems, greedy) | value |\n|---|---:|\n"
              f"| teacher ({cfg.teacher_layers} layers x {cfg.teacher_hidden}) | {teacher_acc:.3f} |\n"
              f"| student ({cfg.student_layers} layers x {cfg.student_hidden}) before TrOPD | {before:.3f} |\n"
              f"| student after {cfg.tropd_steps} TrOPD steps | {after:.3f} |\n"
              f"| mean trust fraction | {summary['trust_fraction']:.3f} |\n"
              f"| wall time (s) | {summary['wall_seconds']:.0f} |\n"
              f"plot: {cfg.out}/demo.png, TensorBoard: tensorboard --logdir {cfg.out}/tensorboard")
    dist.barrier()
    return summary


def plot(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (x, y, title) in zip(axes, [("step", "loss", "TrOPD loss"), ("step", "trust_fraction", "trust fraction"),
                                        ("accuracy_step", "accuracy", "held-out accuracy")]):
        ax.plot(history[x], history[y], marker="o" if y == "accuracy" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Preparing the built-in tiny task: the files and models that the ``tiny`` recipe names.

Under a root folder: ``prompts.jsonl`` (training prompts with answers), ``held_out.jsonl``
(evaluation problems: the test set), ``validation.jsonl`` (problems for choices such as
learning rates; the three splits are disjoint), ``tokenizer.model`` (sentencepiece trained on
the task), and two supervised fine-tuned checkpoints: ``teacher`` (solves the task well) and
``student_init`` (a smaller model that knows the format but not the arithmetic). Each is made
once and reused; a cached model trained with other settings is refused, not silently reused.
"""
from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field

import torch.distributed as dist
from tqdm import tqdm

from ..logs import logger
from ..losses import SFTConfig
from ..seeds import stream_seed
from ..megatron import ModelConfig, OptimConfig, ParallelConfig, build_student, train_step
from ..megatron.checkpoint import checkpoint_metadata, latest_checkpoint, save_checkpoint
from ..megatron.rollout import Rollout, to_microbatches
from ..tokenizer import SentencePieceTokenizer, check_tokenizer
from .arithmetic import ArithmeticConfig, Problem, make_split


@dataclass
class TinyTaskConfig:
    seed: int = 0
    task: ArithmeticConfig = field(default_factory=lambda: ArithmeticConfig(2, 2, max_operand=9, max_multiplier=5))
    train_problems: int = 3000  # of ~4,400 distinct problems with the default task
    eval_problems: int = 400  # held_out.jsonl: the test set
    validation_problems: int = 200  # validation.jsonl: for choices (make compare), disjoint from both
    vocab_size: int = 64  # requested; sentencepiece stops at 40 on the default task
    sft_batch: int = 64
    sft_lr: float = 3e-3
    teacher_sft_steps: int = 300
    student_sft_steps: int = 150


def _write_jsonl(path: str, problems: list[Problem]) -> None:
    with open(path + ".tmp", "w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n")
    os.replace(path + ".tmp", path)


def write_task_files(root: str, cfg: TinyTaskConfig, template: str, train: list[Problem]) -> None:
    """Write the prompt files and tokenizer under ``root`` unless present (the tokenizer, written
    after the training and test files, marks them finished; the validation split, added later,
    is checked on its own, so older preparations get it too); ``train`` is the training split.
    Call on one process."""
    seen = frozenset(p.question for p in train)
    held_out = make_split(cfg.eval_problems, stream_seed(cfg.seed, "held_out_problems"), cfg.task, seen)
    if not os.path.exists(os.path.join(root, "tokenizer.model")):
        os.makedirs(root, exist_ok=True)
        _write_jsonl(os.path.join(root, "prompts.jsonl"), train)
        _write_jsonl(os.path.join(root, "held_out.jsonl"), held_out)
        SentencePieceTokenizer.train([f"{template.format(prompt=p.question)} {p.solution}" for p in train],
                                     os.path.join(root, "tokenizer.model"), cfg.vocab_size)
    if not os.path.exists(os.path.join(root, "validation.jsonl")):
        validation = make_split(cfg.validation_problems, stream_seed(cfg.seed, "validation_problems"), cfg.task,
                                seen | frozenset(p.question for p in held_out))
        _write_jsonl(os.path.join(root, "validation.jsonl"), validation)


def training_split(cfg: TinyTaskConfig) -> list[Problem]:
    return make_split(cfg.train_problems, stream_seed(cfg.seed, "training_problems"), cfg.task)


def _supervised(student, train: list[Problem], tok, template: str, cfg: TinyTaskConfig, steps: int, what: str) -> None:
    rng = random.Random(stream_seed(cfg.seed, f"sft_batches_{what}", steps=steps))
    bar = tqdm(range(steps), desc=f"SFT {what}", disable=dist.get_rank() != 0, file=sys.stderr)
    for step in bar:
        rollouts = []
        for p in rng.sample(train, cfg.sft_batch):
            answer = tok.encode(" " + p.solution) + [tok.eos_id]
            rollouts.append(Rollout(tok.encode(template.format(prompt=p.question)), [], answer, [0.0] * len(answer), True))
        result = train_step(student, None, to_microbatches(rollouts, cfg.sft_batch, tok.eos_id), SFTConfig(),
                            vocab_size=tok.vocab_size, step=step, total_steps=steps)
        if result.metrics:
            bar.set_postfix(loss=f"{result.metrics['loss']:.3f}")


def supervised_model(path: str, model: ModelConfig, parallel: ParallelConfig, train: list[Problem], tok,
                     template: str, cfg: TinyTaskConfig, steps: int) -> None:
    """Make sure ``path`` holds ``model`` fine-tuned for ``steps`` on ``train`` (collective)."""
    wanted = {"model": asdict(model), "sft_steps": steps, "task": asdict(cfg.task), "train_problems": cfg.train_problems,
              "seed": cfg.seed}
    what = os.path.basename(path.rstrip("/"))
    cached = latest_checkpoint(path)
    if cached is not None:
        saved = checkpoint_metadata(cached)["trainer"]
        if saved != wanted:
            raise SystemExit(f"{path} holds a {what} trained with {saved}, not {wanted}: delete {path} to retrain it")
        logger.info(f"{what}: cached in {path}")
        return
    optim = OptimConfig(lr=cfg.sft_lr, warmup_steps=min(20, steps // 5), min_lr=1e-4)
    student = build_student(model, parallel, optim, steps)
    _supervised(student, train, tok, template, cfg, steps, what)
    save_checkpoint(path, steps, student.model.module, trainer_state=wanted)


def prepare(run, cfg: TinyTaskConfig) -> None:
    """Everything the ``tiny`` recipe's RunConfig ``run`` names, made where missing (collective;
    model parallelism must be initialised)."""
    template = run.data.chat_template
    train = training_split(cfg)
    if dist.get_rank() == 0:
        write_task_files(os.path.dirname(run.tokenizer), cfg, template, train)
    dist.barrier()
    tok = SentencePieceTokenizer(run.tokenizer)
    check_tokenizer(run, tok)
    for spec, steps in ((run.teacher, cfg.teacher_sft_steps), (run.student, cfg.student_sft_steps)):
        supervised_model(spec.checkpoint, spec.model, run.parallel, train, tok, template, cfg, steps)

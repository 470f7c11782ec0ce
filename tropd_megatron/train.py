"""The training loop of a run: one RunConfig in, a trained student checkpoint out.

    torchrun --nproc-per-node 2 -m launch.train --recipe tiny schedule.steps=2

Builds the frozen teacher and the student (from their checkpoints), resumes from the run's
latest checkpoint when there is one (weights, optimizer, LR schedule, data position, RNG,
evaluation history), then repeats rollouts -> teacher signal -> training step, with periodic
held-out evaluation, checkpoints, TensorBoard scalars and a progress line. SIGTERM or SIGUSR1
(Slurm preemption) finishes the current step, writes a checkpoint and exits with
``PREEMPTED_EXIT`` so that a launcher can requeue the job.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import ConfigError, RunError
from .data import PromptStream
from .evaluation.avg_at_n import evaluate, load_problems
from .logs import MetricsWriter, logger, logging_rank
from .megatron import build_gpt, build_student, initialize, shared_vocabulary_rows
from .megatron.groups import ModelGroups
from .megatron.teacher_layout import LayoutGenerator, LayoutTeacher, TeacherLayout, teacher_groups
from .megatron.checkpoint import (checkpoint_metadata, latest_checkpoint, load_checkpoint, save_checkpoint,
                                  start_optimizer_state)
from .megatron.hf_checkpoint import is_hf_folder, load_hf_weights
from .megatron.inference import Generator, size_kv_caches
from .megatron.iteration import IterationSettings, run_iteration
from .megatron.step import any_rank
from .planner import request_lengths
from .platform import Platform
from .run_config import RunConfig, flatten, resume_conflicts, to_yaml
from .validate import validate
from .tokenizer import check_same_vocabulary, check_tokenizer, load_tokenizer, prompt_encoder

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a checkpoint was written on a signal; run again to resume


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(PREEMPTED_EXIT)


class StalledRun(RunError):
    """Too many updates in a row were skipped (``optim.max_skipped_in_a_row``)."""


class _StopFlag:
    """Set by SIGTERM / SIGUSR1; ranks agree on it after each step (a signal may reach only some)."""

    def __init__(self):
        self.raised = None
        self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def _handler(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def agreed(self) -> bool:
        return any_rank(self.raised is not None)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class TrainerState:
    """What a checkpoint holds beside the weights, the optimizer and the LR schedule: written
    whole by ``Trainer.save`` and read back whole on resume (one schema for both)."""

    step: int = 0  # updates done; saved as the checkpoint's own step
    data: dict = field(default_factory=dict)  # the prompt stream's position
    eval: list = field(default_factory=list)  # every evaluation's result
    skipped_steps: list = field(default_factory=list)  # steps whose update was skipped
    spike_norms: list = field(default_factory=list)  # the spike guard's history
    config: dict = field(default_factory=dict)  # the run's settings, flattened (resume conflicts)

    def to_checkpoint(self) -> dict:
        """The checkpoint's trainer entry (the step goes to the checkpoint's own field)."""
        return {k: v for k, v in asdict(self).items() if k != "step"}

    @classmethod
    def from_checkpoint(cls, metadata: dict) -> "TrainerState":
        """The state in a checkpoint's metadata (``checkpoint_metadata``); a checkpoint written
        before this schema kept eval and skipped steps under "history"."""
        saved = {**metadata["trainer"], **metadata["trainer"].get("history", {}), "step": metadata["step"]}
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def load_weights(path: str | None, model, config, what: str) -> Path | None:
    """Load ``ModelSpec.checkpoint`` into ``model`` (a GPTModel of ``config``): a Hugging Face
    folder (config.json + safetensors), a run's checkpoint root (its latest) or one step folder.
    Returns the folder read, None for random weights (``path`` None)."""
    if path is None:
        logger.warning("%s.checkpoint is null: %s has RANDOM weights (acceptable for smoke tests only)", what, what)
        return None
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{what}.checkpoint={path}: no such directory")
    if is_hf_folder(root):
        folder = root
        load_hf_weights(model, config, root, what)
    else:
        folder = latest_checkpoint(root) or root
        load_checkpoint(folder, model)
    # a NaN / inf weight would surface much later as masked tokens or a crash inside sampling
    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if any_rank(bad is not None):
        raise ConfigError(f"{what}.checkpoint={path}: {folder} holds non-finite values "
                         f"(in {bad or 'a parameter held by another rank'})")
    return folder


def load_student_weights(student, path: str | None, config) -> None:
    """``load_weights`` into a student that already has its optimizer: with bf16 / fp16 the
    optimizer's fp32 main copies were made from the initial weights and are refreshed here
    (else the first update would start from the random initialisation)."""
    if load_weights(path, student.model.module, config, "student"):
        student.optimizer.reload_model_params()


def trained_student(cfg: RunConfig, weights: str | None = None) -> str:
    """The student weights to evaluate or export: ``weights`` when given, else the run's latest
    checkpoint, else ``student.checkpoint``."""
    found = weights or (cfg.checkpoint.dir if latest_checkpoint(cfg.checkpoint.dir) else cfg.student.checkpoint)
    if found is None:
        raise ConfigError("no weights: the run has no checkpoint and student.checkpoint is null (pass --weights)")
    return found


def run_model_configs(cfg: RunConfig):
    """(student, teacher) ModelConfigs as built: one embedding row count (shared_vocabulary_rows)
    that both models' TP sizes divide."""
    student, teacher = shared_vocabulary_rows(cfg.student.model, cfg.teacher.model,
                                              math.lcm(cfg.parallel.tensor, cfg.teacher_parallel.tensor))
    if (student.embedding_rows, teacher.embedding_rows) != (cfg.student.model.embedding_rows,
                                                            cfg.teacher.model.embedding_rows):
        logger.info(f"vocabulary: {student.vocab_size} tokens; both models get {student.embedding_rows} embedding rows "
                    f"(configured: student {cfg.student.model.embedding_rows}, teacher {cfg.teacher.model.embedding_rows})")
    return student, teacher


class Trainer:
    """Everything a run holds; ``run()`` trains to ``schedule.steps``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg = cfg.seeded()
        initialize(cfg.parallel, seed=cfg.schedule.seed)
        validate(cfg, dist.get_world_size(), Platform.detect())  # before any file is read or model built
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        check_tokenizer(cfg, self.tokenizer)
        teacher_tokenizer = self.tokenizer
        if cfg.teacher_tokenizer:
            teacher_tokenizer = load_tokenizer(cfg.teacher_tokenizer)
            check_same_vocabulary(self.tokenizer, teacher_tokenizer)
        student_model, teacher_model = run_model_configs(cfg)
        # the teacher on the student's groups, or on its own layout (teacher.parallel)
        own_groups = teacher_groups(cfg.parallel, cfg.teacher_parallel)
        teacher_gpt = build_gpt(teacher_model, cfg.teacher_parallel, frozen=True, groups=own_groups)
        load_weights(cfg.teacher.checkpoint, teacher_gpt, teacher_model, "teacher")
        self.student = build_student(student_model, cfg.parallel, cfg.optim, cfg.schedule.steps)
        self.encode = encode = prompt_encoder(self.tokenizer, cfg.data.chat_template)  # prompt text -> token ids
        self.prompts = PromptStream(cfg.data, encode)
        self.state = TrainerState()
        resume = latest_checkpoint(cfg.checkpoint.dir) if cfg.checkpoint.resume else None
        if resume is not None:
            # read before any weight loads, so that a conflicting run changes nothing
            saved = TrainerState.from_checkpoint(checkpoint_metadata(resume))
            conflicts = resume_conflicts(saved.config, cfg)
            if conflicts:
                raise ConfigError(f"{resume} was written by a run with other settings; use another checkpoint.dir "
                                 "(or delete it) to start afresh:\n  " + "\n  ".join(conflicts))
            load_checkpoint(resume, self.student.model.module, self.student.optimizer, self.student.scheduler)
            self.restore(saved)
            logger.info(f"resumed from {resume} at step {self.step}")
        else:
            load_student_weights(self.student, cfg.student.checkpoint, student_model)
        if dist.get_rank() == 0:  # after the resume check: a refused run leaves the folder as it was
            os.makedirs(cfg.checkpoint.dir, exist_ok=True)
            with open(os.path.join(cfg.checkpoint.dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
        logger.info(f"run {cfg.name}: {dist.get_world_size()} processes, configuration in "
                    f"{cfg.checkpoint.dir}/config.yaml")
        lengths = request_lengths(cfg)
        self.student_generator = Generator(self.student.model.module, student_model, eos_id=self.tokenizer.eos_id,
                                           engine=cfg.rollout.engine, max_request_tokens=lengths["student"],
                                           name="student")
        self.teacher, self.teacher_generator = teacher_gpt, Generator(
            teacher_gpt, teacher_model, eos_id=teacher_tokenizer.eos_id, engine=cfg.rollout.engine,
            max_request_tokens=lengths["teacher"], name="teacher")
        # Adam's moments exist from here on (torch creates them at the first update), so that
        # a KV cache sized from the free memory leaves room for them
        start_optimizer_state(self.student.optimizer)
        size_kv_caches([self.student_generator] + ([self.teacher_generator] if cfg.rollout.writes_prefixes else []))
        if own_groups is not None:  # scores and writes prefixes for the student's ranks by collectives
            layout = TeacherLayout(ModelGroups.megatron(), own_groups)
            self.teacher = LayoutTeacher(teacher_gpt, layout)
            self.teacher_generator = LayoutGenerator(self.teacher_generator, layout)
            t = cfg.teacher_parallel
            logger.info(f"teacher at its own layout: tensor {t.tensor} x pipeline {t.pipeline} x data "
                        f"{layout.teacher_dp}; student: tensor {cfg.parallel.tensor} x pipeline "
                        f"{cfg.parallel.pipeline} x data {layout.student_dp}")
        self.iteration = IterationSettings(cfg.rollout, cfg.objective.selected(), cfg.schedule.prompts_per_step,
                                           self.tokenizer.vocab_size, cfg.schedule.steps, cfg.schedule.seed)
        self.eval_problems = None
        if cfg.eval.path:
            self.eval_problems = load_problems(replace(cfg.data, path=cfg.eval.path), encode, cfg.eval.max_problems)
        dist.barrier()  # the checkpoint folder exists
        self.metrics = MetricsWriter(cfg.checkpoint.dir, cfg.logging.tensorboard_dir, cfg.logging.wandb, cfg.name,
                                     flatten(cfg))

    @property
    def step(self) -> int:
        return self.state.step

    def snapshot(self) -> TrainerState:
        """The run's state as a checkpoint holds it."""
        guard = self.student.spike_guard
        return replace(self.state, data=self.prompts.state_dict(), spike_norms=list(guard.norms) if guard else [],
                       config=flatten(self.cfg))

    def restore(self, state: TrainerState) -> None:
        """The inverse of ``snapshot``."""
        self.state = state
        self.prompts.load_state_dict(state.data)
        if self.student.spike_guard is not None:
            self.student.spike_guard.norms = list(state.spike_norms)

    def evaluate(self) -> dict:
        e = self.cfg.eval
        results = os.path.join(self.cfg.checkpoint.dir, "eval", f"step_{self.step:08d}.jsonl")
        result = evaluate(self.student_generator, self.eval_problems, self.tokenizer.decode, samples=e.samples,
                          temperature=e.temperature, max_new_tokens=self.cfg.eval_max_new_tokens(),
                          seed=self.cfg.schedule.seed, results_path=results).as_dict()
        result["step"] = self.step
        self.state.eval.append(result)
        self.metrics.scalar(f"eval/avg@{e.samples}", result["avg_at_n"], self.step)
        logger.info(f"eval at step {self.step}: avg@{e.samples} {result['avg_at_n']:.3f} pass@{e.samples} "
                    f"{result['pass_at_n']:.3f} on {result['problems']} problems ({results})")
        return result

    def save(self) -> None:
        save_checkpoint(self.cfg.checkpoint.dir, self.step, self.student.model.module, self.student.optimizer,
                        self.student.scheduler, trainer_state=self.snapshot().to_checkpoint(),
                        optimizer_format=self.cfg.checkpoint.optimizer_format,
                        keep_last=self.cfg.checkpoint.keep_last, keep_every=self.cfg.checkpoint.keep_every)

    def _record(self, metrics: dict, seconds: dict) -> None:
        self.metrics.step(self.step, metrics, seconds)
        if self.step % self.cfg.logging.log_every == 0 or self.step == self.cfg.schedule.steps:
            logger.info(
                f"step {self.step}/{self.cfg.schedule.steps} loss {metrics['loss']:.4f} "
                f"trust {metrics.get('trust_fraction', float('nan')):.3f} len {metrics['response_length']:.1f} "
                f"stopped {metrics['stopped_fraction']:.2f} lr {metrics['lr']:.2e} | rollout {seconds['rollout']:.1f}s "
                f"teacher {seconds['teacher']:.1f}s train {seconds['student'] + seconds['optimizer']:.1f}s | "
                f"{metrics['tokens_per_second']:.0f} tok/s"
                + (f" | {metrics['nonfinite_tokens']:.0f} tokens with non-finite teacher logits masked"
                   if metrics.get("nonfinite_tokens") else "")
                + (f" | update SKIPPED: {metrics['skip_reason']}" if metrics["skipped_update"] else ""))

    def _check_not_stalled(self, reason) -> None:
        limit, skipped = self.cfg.optim.max_skipped_in_a_row, self.state.skipped_steps
        if limit and skipped[-limit:] == list(range(self.step - limit + 1, self.step + 1)):
            latest = latest_checkpoint(self.cfg.checkpoint.dir)
            raise StalledRun(
                f"the last {limit} updates were all skipped (optim.max_skipped_in_a_row={limit}; last reason: "
                f"{reason}); stopping without a checkpoint, the next launch resumes from "
                f"{latest or 'the start'}")

    def run(self) -> dict:
        cfg = self.cfg
        stop = _StopFlag()
        started = time.time()
        # a bar on a terminal only (disable=None); logs get the progress lines
        bar = tqdm(total=cfg.schedule.steps, initial=self.step, desc=f"{cfg.name} {cfg.objective.name}",
                   disable=None if logging_rank() else True, file=sys.stderr, dynamic_ncols=True)
        try:
            if self.eval_problems and self.step == 0:  # before training (a resumed run has evaluated)
                self.evaluate()
            while self.step < cfg.schedule.steps:
                result = run_iteration(self.student, self.teacher, self.student_generator, self.teacher_generator,
                                       self.prompts, self.iteration, self.step)
                self.state.step += 1
                if result.step.skipped:
                    self.state.skipped_steps.append(self.step)
                metrics = dict(result.metrics, lr=result.step.lr, grad_norm=result.step.grad_norm,
                               skipped_update=result.step.skipped, skip_reason=result.step.skip_reason,
                               skipped_updates=len(self.state.skipped_steps))
                self._record(metrics, result.seconds)
                self._check_not_stalled(result.step.skip_reason)
                bar.update(1)
                last = self.step == cfg.schedule.steps
                if self.eval_problems and cfg.eval.due(self.step, cfg.schedule.steps):
                    self.evaluate()
                preempted = stop.agreed()
                if preempted or cfg.checkpoint.due(self.step, cfg.schedule.steps):
                    self.save()
                if preempted and not last:
                    logger.info(f"{stop.raised or 'a signal on another rank'}: checkpoint at step {self.step} written; "
                                f"exiting with {PREEMPTED_EXIT} (run again to resume)")
                    raise Preempted()
        finally:
            bar.close()
            stop.restore()
            self.metrics.close()
        skipped = self.state.skipped_steps
        logger.info(f"done: {self.step} steps in {time.time() - started:.0f} s"
                    + (f" ({len(skipped)} updates skipped, steps {skipped})" if skipped else "")
                    + f"; checkpoints in {cfg.checkpoint.dir}")
        return self.state


def train(cfg: RunConfig) -> TrainerState:
    return Trainer(cfg).run()

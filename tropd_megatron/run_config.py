"""The typed configuration of a run: what a recipe returns and the trainer reads.

Each part's defaults live in its own dataclass (models, parallel layout and optimizer in
``megatron.config``, objectives in ``losses.config``, rollouts, prompt data); this module only
composes them. Command-line overrides are dotted keys (``schedule.steps=2``) merged by
OmegaConf onto the typed structure, so a wrong key or type is refused before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .data import PromptDataConfig
from .losses import DISTILLATION_OBJECTIVES, DenseKLConfig, EOPDConfig, OPDConfig, REOPOLDConfig, TrOPDConfig
from .config.model import ModelConfig, OptimConfig, ParallelConfig, TeacherParallelConfig
from .config.rollout import RolloutConfig
from . import ConfigError

# How Megatron's distributed optimizer lays out its state: "dp_reshardable" saves each rank's
# shard in parallel with no exchange and loads at any data-parallel size, but only at the
# saving run's tensor x pipeline layout; "fully_reshardable" gathers the state over
# data-parallel ranks into per-parameter tensors (the full state of a TP x PP shard is briefly
# held on every rank) and loads at any layout.
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


@dataclass
class ModelSpec:
    model: ModelConfig
    # the weights: a Hugging Face folder (config.json + *.safetensors), a run's checkpoint root
    # (its ``latest``) or one ``step_*`` folder. None: random weights, acceptable only for smoke
    # tests (the trainer says so loudly).
    checkpoint: Optional[str] = None


@dataclass
class TeacherSpec(ModelSpec):
    """The teacher: its model, weights and its own parallel layout (default: the student's)."""

    parallel: TeacherParallelConfig = field(default_factory=TeacherParallelConfig)


@dataclass
class ObjectiveChoice:
    """``name`` selects one objective; every objective keeps its own settings here so that an
    override such as ``objective.tropd.outlier=clip`` is typed and checked: one field per entry
    of ``losses.DISTILLATION_OBJECTIVES``, of its class (checked below, at import)."""

    name: str = "tropd"
    opd: OPDConfig = field(default_factory=OPDConfig)
    eopd: EOPDConfig = field(default_factory=EOPDConfig)
    reopold: REOPOLDConfig = field(default_factory=REOPOLDConfig)
    tropd: TrOPDConfig = field(default_factory=TrOPDConfig)
    dense_kl: DenseKLConfig = field(default_factory=DenseKLConfig)

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name={self.name!r}; expected one of {OBJECTIVES}")

    def selected(self):
        return getattr(self, self.name)


OBJECTIVES = tuple(DISTILLATION_OBJECTIVES)
_fields = {f.name: f.type for f in fields(ObjectiveChoice) if f.name != "name"}
if _fields != {name: cls.__name__ for name, cls in DISTILLATION_OBJECTIVES.items()}:
    raise ImportError(f"ObjectiveChoice's fields {_fields} do not follow losses.DISTILLATION_OBJECTIVES")


@dataclass
class ScheduleConfig:
    steps: int = 100
    prompts_per_step: int = 64  # global: split over data-parallel ranks
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.prompts_per_step < 1:
            raise ConfigError(f"schedule.steps={self.steps} and schedule.prompts_per_step={self.prompts_per_step} "
                             "must be >= 1")


@dataclass
class CheckpointConfig:
    dir: str = "runs/checkpoints"
    save_every: int = 50  # steps; the last step is always saved
    resume: bool = True  # continue from ``dir``'s latest checkpoint when there is one
    # the distributed optimizer's state: "dp_reshardable" (parallel, resumes at any data-parallel
    # size) or "fully_reshardable" (gathered; resumes at any tensor / pipeline layout too)
    optimizer_format: str = "dp_reshardable"
    # older step folders are deleted once a newer save is complete (0: keep all); steps that
    # are multiples of keep_every are kept as well (0: none)
    keep_last: int = 3
    keep_every: int = 0

    def due(self, step: int, steps: int) -> bool:
        """Whether a checkpoint is written after ``step`` of ``steps`` (a preempted run writes one
        whatever this says)."""
        return step == steps or step % self.save_every == 0

    def __post_init__(self):
        if self.save_every < 1 or self.keep_last < 0 or self.keep_every < 0:
            raise ConfigError(f"checkpoint.save_every={self.save_every} must be >= 1, keep_last={self.keep_last} and "
                             f"keep_every={self.keep_every} >= 0")
        if self.optimizer_format not in OPTIMIZER_FORMATS:
            raise ConfigError(f"checkpoint.optimizer_format={self.optimizer_format!r}; expected one of "
                             f"{OPTIMIZER_FORMATS}")


WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases: every metric of metrics.jsonl (``train/*``, ``time/*``, ``eval/*``),
    from the logging rank, in one W&B run per checkpoint directory (a resume continues it).
    ``mode`` auto: online when an API key is configured and the server answers, else offline
    (the run folder ``dir``/wandb holds it; ``wandb sync`` uploads it later)."""

    project: Optional[str] = None  # None: no W&B
    name: Optional[str] = None  # the W&B run's name; None: the run's ``name``
    mode: str = "auto"
    dir: Optional[str] = None  # None: checkpoint.dir
    entity: Optional[str] = None  # team or user; None: W&B's default

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb.mode={self.mode!r}; expected one of {WANDB_MODES}")


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None  # None: no TensorBoard events
    log_every: int = 1  # a progress line every N steps
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    """Held-out evaluation during training: avg@n accuracy on a JSONL of problems with
    reference answers (``evaluation.avg_at_n``). ``path`` None: no evaluation."""

    path: Optional[str] = None
    every: int = 0  # steps; 0: before training and after the last step only
    samples: int = 1  # n of avg@n
    temperature: float = 1.0  # with samples > 1; one sample is greedy
    max_problems: int = 0  # 0: all
    max_new_tokens: Optional[int] = None  # None: the rollouts' budget (rollout.sampling.max_new_tokens)

    def due(self, step: int, steps: int) -> bool:
        """Whether the evaluation runs after ``step`` of ``steps`` (step 0: before training)."""
        return self.path is not None and (step in (0, steps) or bool(self.every and step % self.every == 0))


@dataclass
class RunConfig:
    name: str
    tokenizer: str  # a Hugging Face tokenizer folder or a sentencepiece model file
    teacher: TeacherSpec  # a ModelSpec is taken too (the student's layout)
    student: ModelSpec
    data: PromptDataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveChoice = field(default_factory=ObjectiveChoice)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gpu: str = "H100-80GB"  # what the memory planner checks the layout against
    # the teacher's own tokenizer when its end-of-turn token differs from the student's (the
    # vocabulary must be the same); None: the student's ``tokenizer``
    teacher_tokenizer: Optional[str] = None

    def __post_init__(self):
        if type(self.teacher) is ModelSpec:  # a recipe written before teacher.parallel existed
            self.teacher = TeacherSpec(self.teacher.model, self.teacher.checkpoint)

    @property
    def teacher_parallel(self) -> ParallelConfig:
        """The teacher's layout: ``teacher.parallel``, sizes left null taken from ``parallel``."""
        return self.teacher.parallel.resolve(self.parallel)

    @property
    def teacher_on_own_layout(self) -> bool:
        """Whether the teacher's tensor x pipeline differs from the student's (its own groups)."""
        t, s = self.teacher_parallel, self.parallel
        return (t.tensor, t.pipeline) != (s.tensor, s.pipeline)

    @property
    def min_world_size(self) -> int:
        """The fewest processes both layouts fit (data parallel 1 for the larger)."""
        t, s = self.teacher_parallel, self.parallel
        return math.lcm(s.tensor * s.pipeline, t.tensor * t.pipeline)

    def eval_max_new_tokens(self) -> int:
        """The evaluation budget: ``eval.max_new_tokens``, else the rollouts'."""
        return self.eval.max_new_tokens or self.rollout.sampling.max_new_tokens

    def seeded(self) -> "RunConfig":
        """This configuration with every seed left null set to the run's ``schedule.seed``: one
        run seed, from which each stream derives its own (``seeds.stream_seed``: data order,
        rollouts, the trust mask, evaluation); ``data.seed`` and ``objective.tropd.seed`` set
        explicitly override it for their stream. The trainer runs on this."""
        seed = self.schedule.seed
        data = self.data if self.data.seed is not None else replace(self.data, seed=seed)
        tropd = self.objective.tropd
        objective = self.objective if tropd.seed is not None else replace(self.objective, tropd=replace(tropd, seed=seed))
        return replace(self, data=data, objective=objective)


def leaf_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key that an override may set."""
    keys = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            keys += leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def flatten(config) -> dict:
    """{dotted key: value} of every leaf."""
    return {key: _lookup(config, key) for key in leaf_keys(config)}


def _lookup(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


# keys a resumed run may change: where it logs and evaluates, its layouts (checkpoints reshard;
# the teacher is frozen and not in them), where the frozen models' weights are read from; not
# what it trains
RESUMABLE_CHANGES = ("name", "gpu", "logging.", "eval.", "checkpoint.", "parallel.", "teacher.checkpoint",
                     "teacher.parallel.", "student.checkpoint")


def resume_conflicts(saved: dict, config: RunConfig) -> list[str]:
    """Keys whose values differ between a checkpoint's run and ``config``, ignoring
    RESUMABLE_CHANGES and keys that only one side knows (settings added or removed by a newer
    version of this code): resuming across such a difference would mix two experiments."""
    now = flatten(config)
    return [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in sorted(set(saved) & set(now))
            if not k.startswith(RESUMABLE_CHANGES) and saved[k] != now[k]]


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """``config`` with dotted ``key=value`` overrides applied, validated by the dataclasses.

    An unknown key is refused with the valid keys under its deepest known parent listed.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example schedule.steps=2)")
    base = OmegaConf.structured(config)
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = e.full_key or str(e)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        valid = [k for k in leaf_keys(config) if k.startswith(parent)] or leaf_keys(config)
        raise ConfigError(f"unknown override key {key!r}; valid keys{' under ' + parent[:-1] if parent else ''}: "
                         + ", ".join(valid)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"override rejected: {e.full_key}: {str(e.msg).splitlines()[0]}") from None


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))

"""Objective configurations: the one place where their defaults live.

Equations: docs/losses.md ("Objectives and their defaults"). Every objective's
reward-weighted term -A * log p_S(y) becomes the PPO-clipped importance-ratio form when
rollout-time log-probs are passed (stale rollouts); on-policy it has the same gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from .estimators import TOPK_KL_VARIANTS
from .. import ConfigError


def _choice(obj, name: str, options: tuple) -> None:
    value = getattr(obj, name)
    if value not in options:
        raise ConfigError(f"{type(obj).__name__}.{name}={value!r}; expected one of {options}")


def _check(obj, name: str, ok: bool, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r}; must be {requirement}")


IMPORTANCE = ("ppo", "tis")


@dataclass
class OPDConfig:
    """On-policy distillation: L_t = -r_t log p_S(y_t), r_t = sg(log p_T(y_t) - log p_S(y_t))."""

    # What each objective needs, declared here and asked for by the pipeline (which never
    # tests objective types): the teacher as a compact "signal" (TeacherSignal), its
    # "logits" shard (dense), or "none"; whether it reads rollout-time log-probs (a reward
    # term to correct for stale rollouts); whether it takes teacher-prefix tokens.
    teacher_input: ClassVar[str] = "signal"
    uses_rollout_logprobs: ClassVar[bool] = True
    uses_prefix_mask: ClassVar[bool] = False

    # how rollout_logprobs weight the policy-gradient term, rho = p_train(y) / p_rollout(y):
    # "ppo": PPO's clipped -min(rho A, clip(rho, 1 - ppo_clip, 1 + ppo_clip) A), for stale
    # rollouts (several updates on one batch); "tis": the truncated importance weight
    # -sg(min(rho, tis_cap)) A log p(y), for fresh rollouts whose sampler (the inference engine's
    # kernels) differs slightly from the training forward: it corrects that mismatch without
    # PPO's clip dropping the gradient of tokens where the two kernels disagree by > ppo_clip
    importance: str = "ppo"
    ppo_clip: float = 0.2
    tis_cap: float = 2.0

    def __post_init__(self):
        _check(self, "ppo_clip", 0 < self.ppo_clip < 1, "in (0, 1)")
        _check(self, "importance", self.importance in IMPORTANCE, f"one of {IMPORTANCE}")
        _check(self, "tis_cap", self.tis_cap >= 1, ">= 1")

    @property
    def signal_topk(self) -> int:
        """How many teacher top-k entries the objective reads."""
        return 0


@dataclass
class EOPDConfig(OPDConfig):
    """Entropy-aware OPD: OPD + alpha * 1[H_T > tau] * top-k forward KL (arXiv 2603.07079)."""

    entropy_threshold: float = 0.8  # tau, nats
    alpha: float = 1.0
    topk: int = 16
    topk_kl: str = "plain"

    def __post_init__(self):
        super().__post_init__()
        _check(self, "topk", self.topk >= 1, ">= 1")
        _check(self, "alpha", self.alpha >= 0, ">= 0")
        _choice(self, "topk_kl", TOPK_KL_VARIANTS)

    @property
    def signal_topk(self) -> int:
        return self.topk


REWARD_FLOORS = ("log_odds", "log_over_one_minus")


@dataclass
class REOPOLDConfig(OPDConfig):
    """Relaxed OPD (arXiv 2603.11137): reward floored at a bound b(lam), token masks.

    ``reward_floor``: ``log_odds`` is b = log(lam / (1 - lam)) (default: -1.386 at lam = 0.2);
    ``log_over_one_minus`` is b = log(lam) / (1 - lam) (-2.012); the paper's text admits both.
    Before ``switch_step`` the mask keeps tokens with r_t >= b; from it on, tokens whose
    student entropy is at least the micro-batch's ``entropy_quantile``-quantile.
    """

    lam: float = 0.2
    reward_floor: str = "log_odds"
    switch_step: int = 100
    entropy_quantile: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        _check(self, "lam", 0 < self.lam < 1, "in (0, 1)")
        _choice(self, "reward_floor", REWARD_FLOORS)
        _check(self, "switch_step", self.switch_step >= 0, ">= 0")
        _check(self, "entropy_quantile", 0 <= self.entropy_quantile <= 1, "in [0, 1]")

    @property
    def bound(self) -> float:
        if self.reward_floor == "log_odds":
            return math.log(self.lam / (1 - self.lam))
        return math.log(self.lam) / (1 - self.lam)


TRUST_MODES = ("stochastic", "deterministic", "random")
OUTLIER_STRATEGIES = ("clip", "mask", "fkl")


@dataclass
class TrOPDConfig(OPDConfig):
    """Trust Region OPD (arXiv 2606.01249).

    Trust probability P_t = min(1, exp(r_t)). ``trust="stochastic"``: M_t ~ Bernoulli(P_t),
    drawn from a hash of (seed, step, token, position, sequence) so every tensor-parallel
    rank draws the same mask with no communication; ``"deterministic"``:
    M_t = 1[r_t >= trust_threshold] (trust_threshold is log delta); ``"random"``, a control
    and not a method: M_t ~ Bernoulli(mean P_t), the micro-batch's mean trust probability over
    its on-policy tokens, drawn blind to each token's own r_t (the stochastic mask's rate on
    tokens chosen at random). Trusted tokens:
    -M_t r_t log p_S(y_t). Outliers (1 - M_t): ``clip`` uses the reward max(r_t, outlier_clip),
    ``mask`` drops them, ``fkl`` uses the forward KL over the teacher's top-k.
    Teacher-prefix tokens (prefix_mask): beta_s * (-log p_S(y_j)) with beta_s cosine-annealed
    from ``prefix_beta`` to 0 over total_steps.
    """

    uses_prefix_mask: ClassVar[bool] = True  # prefix guidance

    trust: str = "stochastic"
    trust_threshold: float = 0.0
    outlier: str = "fkl"
    outlier_clip: float = math.log(0.25)
    topk: int = 64
    topk_kl: str = "plain"
    prefix_beta: float = 1e-3
    seed: Optional[int] = None  # the trust mask's draws; None: the run's schedule.seed (0 outside a run)

    def __post_init__(self):
        super().__post_init__()
        _choice(self, "trust", TRUST_MODES)
        _choice(self, "outlier", OUTLIER_STRATEGIES)
        _choice(self, "topk_kl", TOPK_KL_VARIANTS)
        _check(self, "topk", self.topk >= 1, ">= 1")
        _check(self, "outlier_clip", self.outlier_clip <= 0, "<= 0 (a floor on the log-ratio reward)")
        _check(self, "prefix_beta", self.prefix_beta >= 0, ">= 0")

    @property
    def trust_seed(self) -> int:
        """The trust mask's seed: ``seed``, 0 when it is null (a run sets it to schedule.seed)."""
        return 0 if self.seed is None else self.seed

    @property
    def signal_topk(self) -> int:
        return self.topk if self.outlier == "fkl" else 0


DENSE_KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class DenseKLConfig:
    """Full-vocabulary KL to the teacher on every token: needs the teacher's logits shard
    (dense mode). ``forward`` is KL(p_T || p_S), ``reverse`` is KL(p_S || p_T)."""

    teacher_input: ClassVar[str] = "logits"
    uses_rollout_logprobs: ClassVar[bool] = False  # no reward term
    uses_prefix_mask: ClassVar[bool] = False

    direction: str = "reverse"

    def __post_init__(self):
        _choice(self, "direction", DENSE_KL_DIRECTIONS)

    @property
    def signal_topk(self) -> int:
        return 0


@dataclass
class SFTConfig:
    """Supervised fine-tuning: -log p_S(y_t) on the given tokens; no teacher (the built-in
    task trains its teacher this way)."""

    teacher_input: ClassVar[str] = "none"
    uses_rollout_logprobs: ClassVar[bool] = False
    uses_prefix_mask: ClassVar[bool] = False

    @property
    def signal_topk(self) -> int:
        return 0


ObjectiveConfig = Union[OPDConfig, EOPDConfig, REOPOLDConfig, TrOPDConfig, DenseKLConfig, SFTConfig]

# The distillation objectives a run selects by name (``objective.name``): the one table that the
# run configuration (one ``ObjectiveChoice`` field each, checked against it), the CLI and the
# docs follow. What the step and the planner need of an objective, its class says
# (``teacher_input``, ``uses_rollout_logprobs``, ``uses_prefix_mask``, ``signal_topk``).
# SFTConfig is not one: no teacher (the built-in task trains its teacher with it).
DISTILLATION_OBJECTIVES = {"opd": OPDConfig, "eopd": EOPDConfig, "reopold": REOPOLDConfig, "tropd": TrOPDConfig,
                           "dense_kl": DenseKLConfig}

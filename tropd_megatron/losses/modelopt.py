"""The sharded losses as a ModelOpt distillation criterion (Megatron-Core / Megatron-Bridge).

ModelOpt's Megatron distillation (``modelopt.torch.distill`` with
``modelopt.torch.distill.plugins.megatron``) captures the outputs of the student's and the
teacher's ``output_layer`` with forward hooks and hands them to each criterion as
``loss_fn(student_output, teacher_output, **kwargs)``: logits TP-sharded ``[s, b, V/TP]``.
The criterion returns ``post_forward(per_token_loss [s, b], tp_reduce, is_sequence_parallel)``
(the loss transposed to ``[b, s]`` and two flags); Megatron-Bridge's ``loss_func_kd`` /
Megatron-LM's ``_mask_loss`` then sums ``loss * loss_mask`` and all-reduces that sum over
the tensor-parallel group when ``tp_reduce`` is set (a plain all-reduce: it changes the value,
not the gradient), and Megatron divides by the global token count.

``TropdLogitsLoss`` returns a per-token loss that is already complete and identical on every
tensor-parallel rank (the vocabulary math of ``tropd_megatron.losses`` reduces over the
shards itself, with the right backward rules), so it says ``tp_reduce=False``: the masked
sum then equals ``distillation_loss(...)``'s ``loss_sum`` on the same logits, in value and
in gradient, at any TP size.

Importing this module needs ModelOpt (``nvidia-modelopt[torch]``) and megatron-core;
``import tropd_megatron.losses`` itself never imports it.

Which objectives make sense on fixed data
-----------------------------------------
ModelOpt runs the student on dataset tokens (teacher forcing), not on its own samples, but it
has both models' full logit shards at every position. What that allows:

- ``DenseKLConfig("forward" | "reverse")``: the exact full-vocabulary KL per position. It
  does not care where the tokens came from. ``"reverse"`` is what OPD estimates: the K1
  term -r log p_S(y) with y ~ p_S is a one-sample estimator of the reverse-KL gradient at
  that position. With both logit shards at hand, the exact value costs one softmax pass
  over the shards and has no variance. Use it in place of OPD on fixed data.
- ``TopKForwardKL(topk, variant)``: forward KL over the teacher's top-k (TrOPD's outlier
  term, EOPD's extra term; ``renormalised`` is ModelOpt's own ``TopKLogitsKLLoss``).
- ``TrOPDConfig`` / ``OPDConfig`` / ``EOPDConfig`` with the **labels as y_t**: the
  sampled-token terms need a token per position, and on fixed data the dataset's next token
  takes that role. That is a decision with a cost, made explicit here: with y from the data
  and not from p_S, -r_t log p_S(y_t) is no longer an estimate of any KL. It becomes a
  likelihood term weighted by the teacher's log-ratio: it raises p_S(y) where the teacher
  finds the data token likelier than the student does (r > 0) and lowers it where less.
  TrOPD's trust probability min(1, p_T(y) / p_S(y)) is still the teacher's acceptance
  probability of that token as a student draft. So on fixed data, TrOPD keeps the likelihood
  term where the teacher accepts the data token and falls back to the top-k forward KL
  (``outlier="fkl"``) or to the clipped reward (``"clip"``) where it does not: a
  data-weighted mix of the two. Only when the data was sampled from the current student
  (self-generated, fresh) is this the paper's objective. Otherwise prefer the dense or top-k
  KL.
  The labels reach the criterion by ``compute_kd_loss(labels=...)`` or, unchanged under
  Megatron-Bridge's ``loss_func_kd`` (which passes no arguments), through
  ``watch_labels(model)``, which records the ``labels`` the model's forward receives, the
  way ModelOpt's hooks record the logits.

Not offered: ``REOPOLDConfig`` (after its switch step the mask is a quantile over the
micro-batch's loss tokens, and the criterion never sees the loss mask), teacher-prefix
guidance (no prefix mask in this path; it is plain SFT on teacher tokens: Megatron's own LM
loss with ``skip_lm_loss=False``), PPO importance ratios (no rollouts), ``SFTConfig`` (that
is the LM loss), temperature (ModelOpt's ``logit_kl_temperature``), and the metrics dict
(a criterion returns one tensor). The stochastic trust mask hashes (seed, ``step``, token
keys); the keys come from each row's labels with every position counted (the loss mask is
not known here), so set ``criterion.step`` every iteration, or revisited data gets the same
draws; under context parallelism they hash each rank's chunk of a row, not the whole row. A
token where the teacher's logits are non-finite gets loss 0 and zero gradient, but it still
counts in Megatron's token count (that count comes from the loss mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

try:
    from modelopt.torch.distill.plugins.megatron import BaseLoss
except ImportError as error:  # a clear message instead of a deep traceback
    raise ImportError(
        "tropd_megatron.losses.modelopt needs NVIDIA ModelOpt with megatron-core "
        "(pip install 'nvidia-modelopt[torch]'); tropd_megatron.losses works without it"
    ) from error

from .collectives import ProcessGroup, VocabShard, group_size
from .config import DenseKLConfig, EOPDConfig, OPDConfig, TrOPDConfig
from .estimators import TOPK_KL_VARIANTS, topk_forward_kl
from .objectives import OBJECTIVES, TokenView, sequence_token_keys
from .teacher import TeacherSignal
from .vocab import dense_forward_kl, dense_reverse_kl, gather_logprobs

__all__ = ["TopKForwardKL", "TropdLogitsLoss"]


@dataclass(frozen=True)
class TopKForwardKL:
    """Forward KL over the teacher's top-k tokens per position (``topk_forward_kl``):
    ``plain`` sum_K q (log q - log p) (TrOPD's outlier term), ``renormalised`` both
    distributions renormalised over K (ModelOpt's ``TopKLogitsKLLoss``), ``tail`` plain plus a
    bucket for the mass outside K."""

    topk: int = 64
    variant: str = "plain"

    def __post_init__(self):
        if self.topk < 1:
            raise ValueError(f"TopKForwardKL.topk={self.topk!r}; must be >= 1")
        if self.variant not in TOPK_KL_VARIANTS:
            raise ValueError(f"TopKForwardKL.variant={self.variant!r}; expected one of {TOPK_KL_VARIANTS}")


_LABEL_OBJECTIVES = (OPDConfig, EOPDConfig, TrOPDConfig)  # exact types: REOPOLDConfig is refused
# GPTModel.forward(input_ids, position_ids, attention_mask, decoder_input, labels, ...)
_LABELS_POSITION = 4


class TropdLogitsLoss(BaseLoss):
    """A ``tropd_megatron.losses`` objective as a ModelOpt Megatron distillation criterion.

    Put it on the logits layers:
    ``criterion={("output_layer", "output_layer"): TropdLogitsLoss(student.config, objective)}``.
    The class name contains "Logits", which ModelOpt's ``LogitsAndIntermediatesLossBalancer``
    needs to find the logits loss.

    Args:
        model_config: the student's Megatron ``TransformerConfig`` (ModelOpt's ``BaseLoss``
            argument). Its ``tensor_model_parallel_size`` says whether the logits are sharded.
        objective: ``DenseKLConfig`` (default: forward KL), ``TopKForwardKL``, or, with labels,
            ``TrOPDConfig``, ``OPDConfig`` or ``EOPDConfig`` (see the module docstring for what
            they mean on fixed data).
        vocab_size: the tokenizer's true vocabulary size; logit columns at ids >= it
            (Megatron's vocabulary padding) are left out of every softmax. None: all columns.
        tp_group: the group the vocabulary is split over. None: Megatron's tensor-parallel
            group from ``parallel_state`` when the config's TP size is > 1, as ModelOpt's own
            losses do.
        step: training step, for the stochastic trust mask's draws; update it every iteration.

    ``forward(predictions, targets, labels=None)``: predictions and targets are the student's
    and the teacher's ``output_layer`` outputs (``(logits, bias)`` or logits), ``[s, b, V/TP]``;
    labels ``[b, s]`` the dataset's next tokens (for the sampled-token objectives). Returns
    ``post_forward(per_token_loss, tp_reduce=False)``: the per-token loss ``[b, s]`` in fp32,
    complete and identical on every TP rank.
    """

    def __init__(self, model_config, objective=None, *, vocab_size: Optional[int] = None,
                 tp_group: ProcessGroup = None, step: int = 0):
        super().__init__(model_config)
        objective = DenseKLConfig("forward") if objective is None else objective
        if not isinstance(objective, (DenseKLConfig, TopKForwardKL)) and type(objective) not in _LABEL_OBJECTIVES:
            raise ValueError(
                f"TropdLogitsLoss takes DenseKLConfig, TopKForwardKL, TrOPDConfig, OPDConfig or EOPDConfig, not "
                f"{type(objective).__name__} (see tropd_megatron.losses.modelopt for why)"
            )
        self.objective = objective
        self.vocab_size = vocab_size
        self.step = step
        self._tp_group = tp_group
        self._labels = None  # recorded by watch_labels' hook, consumed by the next forward
        self._hooks = []

    @property
    def needs_labels(self) -> bool:
        return type(self.objective) in _LABEL_OBJECTIVES

    def tp_group(self) -> ProcessGroup:
        """The group the logits' vocabulary is split over (None: unsharded)."""
        tp = getattr(self._config, "tensor_model_parallel_size", 1)
        group = self._tp_group
        if group is None and tp > 1:
            from megatron.core import parallel_state

            group = parallel_state.get_tensor_model_parallel_group()
        if group_size(group) != tp:
            raise ValueError(f"the tensor-parallel group has {group_size(group)} ranks; the model config says "
                             f"tensor_model_parallel_size={tp}")
        return group

    def watch_labels(self, model: torch.nn.Module):
        """Record the ``labels`` that ``model``'s forward receives (keyword, or GPTModel's fifth
        positional argument) for the next ``forward``: the sampled-token objectives then work
        under a loss function that passes nothing to ``compute_kd_loss`` (Megatron-Bridge's
        ``loss_func_kd``). Register it on the model that the training step calls (the
        converted ``DistillationModel``, before any DDP wrapping). Returns the hook handle."""

        def record(module, args, kwargs):
            labels = kwargs.get("labels")
            if labels is None and len(args) > _LABELS_POSITION:
                labels = args[_LABELS_POSITION]
            self._labels = labels

        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        self._hooks.append(handle)
        return handle

    def forward(self, predictions, targets, labels: Optional[torch.Tensor] = None):
        predictions, targets = self.pre_forward(predictions, targets)
        recorded, self._labels = self._labels, None
        labels = recorded if labels is None else labels
        if predictions.dim() != 3 or targets.shape != predictions.shape:
            raise ValueError(f"student logits {tuple(predictions.shape)} and teacher logits {tuple(targets.shape)}; "
                             "expected one shape [s, b, V/TP]")
        if self.needs_labels and labels is None:
            raise ValueError(
                f"{type(self.objective).__name__} needs the labels (the token at each position): pass "
                "compute_kd_loss(labels=...) or call criterion.watch_labels(model) once"
            )
        per_token = self.per_token_loss(predictions, targets, labels)
        return self.post_forward(per_token, tp_reduce=False, is_sequence_parallel=False)

    def per_token_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The objective per position, ``[s, b]`` (fp32), from the shards ``[s, b, V/TP]`` and
        labels ``[b, s]``: the same functions and steps as ``distillation_loss``, without the
        loss mask (ModelOpt applies it after ``post_forward``)."""
        config, group, vocab = self.objective, self.tp_group(), self.vocab_size
        S, B, local = student_logits.shape
        if labels is not None:
            if tuple(labels.shape) != (B, S):
                raise ValueError(f"labels has shape {tuple(labels.shape)}; expected [b, s] = {(B, S)}")
            true_vocab = VocabShard.of(local, group, vocab).vocab_size
            labels = labels.long()
            labels = torch.where((labels >= 0) & (labels < true_vocab), labels, 0)  # masked positions
            ids = labels.t()  # [s, b], the logits' layout
        else:
            ids = torch.zeros((S, B), dtype=torch.long, device=student_logits.device)
        teacher_logits = teacher_logits.detach()
        topk = config.topk if isinstance(config, TopKForwardKL) else config.signal_topk
        signal = TeacherSignal.from_logits(teacher_logits, ids, topk=topk, tp_group=group, vocab_size=vocab)

        if isinstance(config, DenseKLConfig):
            kl = dense_forward_kl if config.direction == "forward" else dense_reverse_kl
            if not bool(signal.valid.all()):
                teacher_logits = torch.where(signal.valid[..., None], teacher_logits, 0.0)
            per_token = kl(student_logits, teacher_logits, tp_group=group, vocab_size=vocab)
        elif isinstance(config, TopKForwardKL):
            logprobs, _ = gather_logprobs(student_logits, signal.topk_ids.long(), tp_group=group, vocab_size=vocab)
            per_token = topk_forward_kl(logprobs, signal.topk_logprobs, config.variant)
        else:
            k = config.signal_topk
            all_ids = torch.cat([ids[..., None], signal.topk_ids[..., :k].long()], dim=-1)
            logprobs, student_entropy = gather_logprobs(student_logits, all_ids, tp_group=group, vocab_size=vocab)
            logprob = logprobs[..., 0]
            weight = signal.valid.float()
            tokens = TokenView(
                logprob=logprob,
                topk_logprobs=logprobs[..., 1:],
                teacher_topk_logprobs=signal.topk_logprobs[..., :k],
                log_ratio=(signal.token_logprobs - logprob).detach(),
                teacher_entropy=signal.entropy,
                student_entropy=student_entropy,
                rollout_logprob=None,
                trust_keys=sequence_token_keys(labels, torch.ones_like(labels)).t(),
                weight=weight,
            )
            per_token, _ = OBJECTIVES[type(config)](config, tokens, self.step)
        return torch.where(signal.valid, per_token.float(), 0.0)

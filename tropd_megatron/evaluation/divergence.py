"""How far a student is from its teacher on the student's own samples, measured on held-out
prompts (not read from training metrics, which mix in the objective's masks and weights).

For one sampled response y per prompt x (temperature 1, the student's own distribution):
    reverse_kl   = mean over response tokens of KL(p_S(.|x, y<t) || p_T(.|x, y<t)), exact, full vocabulary
    teacher_nll  = mean over response tokens of -log p_T(y_t | x, y<t)
    student_nll  = the same under the student (its entropy estimate on its own samples)
with the end token counted as a response token. Collective over the job; tensor and data
parallel (each data-parallel rank samples every dp_size-th prompt), pipeline size 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .. import ConfigError
from ..losses import dense_reverse_kl, gather_logprobs
from ..megatron.inference import Generator, SamplingConfig
from ..megatron.rollout import Rollout, to_microbatches
from ..megatron.step import teacher_outputs
from ..seeds import stream_seed


@dataclass
class Divergence:
    reverse_kl: float  # nats a response token
    teacher_nll: float
    student_nll: float
    response_length: float  # tokens, the end token included
    stopped_fraction: float
    responses: int

    def as_dict(self) -> dict:
        return asdict(self)


def _sums(student_logits, teacher_logits, mb, tp_group, vocab_size) -> torch.Tensor:
    """(reverse KL, teacher NLL, student NLL) summed over the response tokens of one micro-batch
    (only those rows of the logits are computed on: prompts are half of every sequence here)."""
    response = mb.loss_mask.bool()
    student_logits, teacher_logits, labels = student_logits[response], teacher_logits[response], mb.labels[response]
    kl = dense_reverse_kl(student_logits, teacher_logits, tp_group=tp_group, vocab_size=vocab_size)
    teacher_lp, _ = gather_logprobs(teacher_logits, labels[:, None], tp_group=tp_group, vocab_size=vocab_size)
    student_lp, _ = gather_logprobs(student_logits, labels[:, None], tp_group=tp_group, vocab_size=vocab_size)
    return torch.stack([kl.double().sum(), -teacher_lp.double().sum(), -student_lp.double().sum()])


@torch.no_grad()
def divergence_to_teacher(student_generator: Generator, student_gpt, teacher_gpt, prompts: list[list[int]], *,
                          vocab_size: int, max_new_tokens: int, eos_id: int, seed: int = 0,
                          micro_batch_size: int = 8) -> Divergence:
    """The student's divergence from the teacher on one sample of each prompt (token ids;
    every rank passes the same list). ``student_gpt`` / ``teacher_gpt``: the unwrapped
    GPTModels, both on the job's own (student's) layout."""
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ConfigError("divergence_to_teacher runs at pipeline size 1 (parallel.pipeline=1)")
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine = prompts[dp_rank::dp_size]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    sums = torch.zeros(5, dtype=torch.float64)  # kl, teacher nll, student nll, tokens, stopped
    generations = student_generator.generate(mine, SamplingConfig(max_new_tokens=max_new_tokens),
                                             seed=stream_seed(seed, "divergence", rank=dp_rank)) if mine else []
    rollouts = [Rollout(p, [], g.tokens, g.logprobs, g.stopped) for p, g in zip(mine, generations)]
    for start in range(0, len(rollouts), micro_batch_size):
        batch = to_microbatches(rollouts[start : start + micro_batch_size], micro_batch_size, eos_id,
                                rollout_logprobs=False)
        outputs = zip(teacher_outputs(student_gpt, batch, topk=0, dense=True, vocab_size=vocab_size),
                      teacher_outputs(teacher_gpt, batch, topk=0, dense=True, vocab_size=vocab_size), batch)
        for student_logits, teacher_logits, mb in outputs:
            sums[:3] += _sums(student_logits, teacher_logits, mb.to(student_logits.device), tp_group, vocab_size).cpu()
            sums[3] += float(mb.loss_mask.sum())
    sums[4] = sum(r.stopped for r in rollouts)
    counts = torch.tensor([len(rollouts)], dtype=torch.float64)
    both = torch.cat([sums, counts])
    dist.all_reduce(both, group=parallel_state.get_data_parallel_group())
    kl, teacher_nll, student_nll, tokens, stopped, responses = both.tolist()
    per_token = max(tokens, 1.0)
    return Divergence(kl / per_token, teacher_nll / per_token, student_nll / per_token, tokens / max(responses, 1.0),
                      stopped / max(responses, 1.0), int(responses))

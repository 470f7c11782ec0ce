"""The compact teacher signal: what the loss needs from the teacher, ~k * 8 bytes a token."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .collectives import ProcessGroup, VocabShard
from .vocab import check_topk, shard_statistics


@dataclass
class TeacherSignal:
    """Per-token teacher statistics over the full vocabulary, identical on every TP rank.

    Shapes: token_logprobs, entropy, valid [B, S]; topk_ids, topk_logprobs
    [B, S, k] sorted by descending probability. ``valid`` is False where a teacher logit in
    the real vocabulary was non-finite: those tokens are masked out of the loss, and their
    other fields are zero. Ids are int32 and log-probs fp32 (cache size ~k * 8 bytes/token).
    """

    token_logprobs: torch.Tensor
    entropy: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    valid: torch.Tensor

    @property
    def topk(self) -> int:
        return self.topk_ids.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return self.token_logprobs.shape

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        return [getattr(self, f.name) for f in fields(self)]

    @staticmethod
    def flat_size(shape, topk: int) -> int:
        """Numbers in ``flat()`` of a signal of ``shape`` [B, S] and ``topk``."""
        return (3 + 2 * topk) * shape[0] * shape[1]

    def flat(self) -> torch.Tensor:
        """The signal as one fp32 vector of ``flat_size`` numbers (ids bit-cast, ``valid`` as
        0 / 1): what a collective moves to another rank, read back with ``from_flat``."""
        return torch.cat([self.token_logprobs.reshape(-1), self.entropy.reshape(-1), self.valid.reshape(-1).float(),
                          self.topk_ids.reshape(-1).view(torch.float32), self.topk_logprobs.reshape(-1)])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape, topk: int) -> "TeacherSignal":
        """The inverse of ``flat`` for a signal of ``shape`` [B, S]."""
        B, S = shape
        n = B * S
        if flat.numel() != cls.flat_size(shape, topk):
            raise ValueError(f"{flat.numel()} numbers for a teacher signal of shape {(B, S)} and top-k {topk}; "
                             f"expected {cls.flat_size(shape, topk)}")
        logprobs, entropy, valid, ids, top = flat.split([n, n, n, n * topk, n * topk])
        return cls(token_logprobs=logprobs.view(B, S), entropy=entropy.view(B, S),
                   topk_ids=ids.contiguous().view(torch.int32).view(B, S, topk),
                   topk_logprobs=top.view(B, S, topk), valid=valid.view(B, S) > 0)

    @classmethod
    @torch.no_grad()
    def from_logits(
        cls,
        teacher_logits: torch.Tensor,
        target_ids: torch.Tensor,
        *,
        topk: int,
        tp_group: ProcessGroup = None,
        vocab_size: Optional[int] = None,
    ) -> "TeacherSignal":
        """Build the signal from the teacher's logits shard [B, S, V/TP] and the sampled
        tokens [B, S] (global ids; out-of-range ids, e.g. -100 at masked positions, are
        read as id 0). One all-gather of O(B * S * k) numbers."""
        if teacher_logits.dim() != 3 or teacher_logits.shape[:2] != target_ids.shape:
            raise ValueError(
                f"teacher_logits has shape {tuple(teacher_logits.shape)}; expected "
                f"[B, S, V/TP] with [B, S] = target_ids.shape {tuple(target_ids.shape)}"
            )
        shard = VocabShard.of(teacher_logits.shape[-1], tp_group, vocab_size)
        check_topk(topk, shard)
        ids = target_ids.reshape(-1, 1).long()
        ids = torch.where((ids >= 0) & (ids < shard.vocab_size), ids, torch.zeros_like(ids))
        stats = shard_statistics(
            teacher_logits.detach().reshape(-1, shard.size), ids, shard, tp_group, topk=topk, check_finite=True
        )
        valid = ~stats.nonfinite
        zero = torch.zeros((), dtype=torch.float32, device=ids.device)

        def clean(x):  # [T] or [T, k] -> fp32, zero where the token is invalid
            x = x.float()
            return torch.where(valid.view(-1, *([1] * (x.dim() - 1))), x, zero)

        B, S = target_ids.shape
        return cls(
            token_logprobs=clean(stats.logits_at_ids[:, 0] - stats.lse).view(B, S),
            entropy=clean(stats.entropy).view(B, S),
            topk_ids=torch.where(valid[:, None], stats.topk_ids, 0).to(torch.int32).view(B, S, topk),
            topk_logprobs=clean(stats.topk_logits - stats.lse[:, None]).view(B, S, topk),
            valid=valid.view(B, S),
        )

"""A teacher on a parallel layout of its own (``teacher.parallel``), in the same job and on the
same ranks as the student: a 70B teacher at TP 8 scoring for an 8B student at TP 2 x DP 4.

The student's data-parallel ranks each hold their own rollouts; the teacher's model-parallel
groups (its data-parallel replicas) each take a contiguous share of all of them, score it in
one pass, and send each student rank the compact ``TeacherSignal`` of its own micro-batches.
Work and results move by ``all_to_all`` collectives over the world: token ids out (O(tokens)),
signals back (O(tokens x k) numbers, nothing of a vocabulary row). Teacher prefixes go the
same way: prompts out, generated prefixes back, generated at the teacher's layout by its own
engine. Dense mode (the teacher's logits shard in the loss) cannot be moved this way and is
refused by ``validate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from ..losses import TeacherSignal
from ..seeds import stream_seed
from ..config.model import ParallelConfig
from .groups import ModelGroups, layout_groups
from .inference import Generation, Generator, SamplingConfig
from .step import MicroBatch, teacher_outputs


def teacher_groups(student: ParallelConfig, teacher: ParallelConfig) -> ModelGroups | None:
    """The teacher's process groups: None when it takes the student's layout (Megatron's global
    groups, the path of a run without ``teacher.parallel``), else its own. Collective."""
    if (teacher.tensor, teacher.pipeline) == (student.tensor, student.pipeline):
        return None
    return layout_groups(teacher.tensor, teacher.pipeline)


@dataclass(frozen=True)
class _Place:
    """A rank's place in both layouts."""

    student_dp: int
    student_last: bool  # on the student's last pipeline stage (where the loss runs)
    teacher_dp: int  # its teacher group (the teacher's data-parallel index)
    teacher_last: bool


def _split(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous runs whose lengths differ by at most one."""
    return [items[p * len(items) // parts : (p + 1) * len(items) // parts] for p in range(parts)]


class TeacherLayout:
    """Who holds what in the student's and the teacher's layouts, and the collectives that move
    work between them. Built once (collective); every method is collective over the world."""

    def __init__(self, student: ModelGroups, teacher: ModelGroups):
        places = [None] * dist.get_world_size()
        dist.all_gather_object(places, (student.dp_rank, student.last_stage, teacher.dp_rank, teacher.last_stage))
        self.places = [_Place(*p) for p in places]
        self.rank, self.world = dist.get_rank(), len(places)
        self.student_dp, self.teacher_dp, self.teacher_pipeline = student.data, teacher.data, teacher.pipeline
        self.me = self.places[self.rank]
        # ranks holding student rank d's rollouts / teacher group g's ranks / its last stage's
        self.holders = {d: [r for r, p in enumerate(self.places) if p.student_dp == d] for d in range(student.data)}
        self.group_ranks = {g: [r for r, p in enumerate(self.places) if p.teacher_dp == g] for g in range(teacher.data)}
        self.group_last = {g: [r for r in ranks if self.places[r].teacher_last]
                           for g, ranks in self.group_ranks.items()}

    def _device(self):
        if dist.get_backend() == "gloo":
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def _gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _work(self, counts: dict) -> list[list[tuple]]:
        """Each teacher group's items (d, i): all student ranks' items in order, split evenly."""
        items = [(d, i) for d in range(self.student_dp) for i in range(counts[d])]
        return _split(items, self.teacher_dp)

    def _exchange(self, send: dict, recv: dict, dtype) -> dict:
        """All-to-all: ``send[dest]`` a list of 1-D tensors for rank dest; ``recv[src]`` the list of
        sizes this rank gets from src. Returns {src: [tensors]} in the order they were sent."""
        device = self._device()
        out_parts = [t.reshape(-1).to(device, dtype) for dest in range(self.world) for t in send.get(dest, [])]
        send_sizes = [sum(t.numel() for t in send.get(dest, [])) for dest in range(self.world)]
        recv_sizes = [sum(recv.get(src, [])) for src in range(self.world)]
        flat = torch.cat(out_parts) if out_parts else torch.empty(0, dtype=dtype, device=device)
        got = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(got, flat, recv_sizes, send_sizes)
        return {src: list(part.split(recv.get(src, []))) if recv.get(src) else []
                for src, part in zip(range(self.world), got.split(recv_sizes))}

    def _holder(self, d: int, dest: int) -> int:
        """The rank that sends student rank d's data to ``dest`` (spread over d's holders)."""
        return self.holders[d][dest % len(self.holders[d])]

    def _from_group(self, g: int, dest: int, last_stage: bool) -> int:
        """The rank of teacher group g that sends its results to ``dest``."""
        ranks = self.group_last[g] if last_stage else self.group_ranks[g]
        return ranks[dest % len(ranks)]

    def _to_groups(self, work: list, payload, size, dtype) -> list:
        """Every rank of teacher group g gets each item of g's share, ``payload(item)`` (a 1-D
        tensor of ``size(item)`` numbers) sent by a holder of the item's student rank. Returns
        this rank's group's items' tensors, in order."""
        send, recv = {}, {}
        for g, items in enumerate(work):
            for dest in self.group_ranks[g]:
                for item in items:
                    src = self._holder(item[0], dest)
                    if src == self.rank:
                        send.setdefault(dest, []).append(payload(item))
                    if dest == self.rank:
                        recv.setdefault(src, []).append(size(item))
        got = self._exchange(send, recv, dtype)
        return [got[self._holder(item[0], self.rank)].pop(0) for item in work[self.me.teacher_dp]]

    def _to_holders(self, work: list, result, size, dtype, *, last_stage: bool) -> list:
        """Each item's result back from one rank of the teacher group that made it to every
        holder of its student rank (only those on the student's last stage when
        ``last_stage``, where the results are on the teacher's last stage too): ``result(index)``
        the 1-D tensor of the sender's share's item ``index``, of ``size(g, index, item)`` numbers.
        Returns this rank's own items' results, in order (empty where it gets none)."""
        send, recv = {}, {}
        for g, items in enumerate(work):
            for index, item in enumerate(items):
                for dest in self.holders[item[0]]:
                    if last_stage and not self.places[dest].student_last:
                        continue
                    src = self._from_group(g, dest, last_stage)
                    if src == self.rank:
                        send.setdefault(dest, []).append(result(index))
                    if dest == self.rank:
                        recv.setdefault(src, []).append(size(g, index, item))
        got = self._exchange(send, recv, dtype)
        if last_stage and not self.me.student_last:
            return []
        return [got[self._from_group(g, self.rank, last_stage)].pop(0)
                for g, items in enumerate(work) for item in items if item[0] == self.me.student_dp]

    # scoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def signals(self, teacher, microbatches: list[MicroBatch], *, topk: int, vocab_size: int,
                end_tokens=None) -> list:
        """This rank's micro-batches' TeacherSignals (on the student's last stage; None elsewhere),
        scored by the teacher groups that ``_work`` assigns them to."""
        meta = self._gather((self.me.student_dp, [tuple(mb.tokens.shape) for mb in microbatches],
                             microbatches[0].segments is not None if microbatches else False))
        shapes, packed = {}, False
        for d, mb_shapes, segmented in meta:
            shapes.setdefault(d, mb_shapes)
            packed |= segmented
        work = self._work({d: len(s) for d, s in shapes.items()})
        n_parts = 3 if packed else 2  # tokens, labels[, segments]

        def token_ids(item):
            mb = microbatches[item[1]]
            return torch.cat([p.reshape(-1).long() for p in [mb.tokens, mb.labels] + ([mb.segments] if packed else [])])

        def token_ids_size(item):
            return n_parts * math.prod(shapes[item[0]][item[1]])

        mine = work[self.me.teacher_dp]
        batches = []
        for (d, i), ids in zip(mine, self._to_groups(work, token_ids, token_ids_size, torch.long)):
            parts = ids.view(n_parts, *shapes[d][i])
            batches.append(MicroBatch(parts[0], parts[1], torch.zeros_like(parts[0], dtype=torch.float),
                                      segments=parts[2] if packed else None))
        if self.teacher_pipeline > 1:  # the pipeline's micro-batches share one shape: pad, crop after
            batches = _same_shape(batches)
        scored = teacher_outputs(teacher, batches, topk=topk, dense=False, vocab_size=vocab_size,
                                 end_tokens=end_tokens)
        scored = [signal and _crop(signal, shapes[d][i]) for signal, (d, i) in zip(scored, mine)]
        # signals back to the student ranks that compute the loss
        got = self._to_holders(work, lambda index: scored[index].flat(),
                               lambda g, index, item: TeacherSignal.flat_size(shapes[item[0]][item[1]], topk),
                               torch.float32, last_stage=True)
        if not self.me.student_last:
            return [None] * len(microbatches)
        return [TeacherSignal.from_flat(flat, shape, topk) for flat, shape in zip(got, shapes[self.me.student_dp])]

    # teacher prefixes --------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, generator: Generator, prompts: list, sampling: SamplingConfig, *, seed: int) -> list[Generation]:
        """``generator.generate`` of this rank's ``prompts``, run by the teacher groups at the
        teacher's layout. Greedy results equal the same-layout teacher's; sampled ones are
        reproducible from the student rank 0's ``seed`` and the layout (each group samples its
        share with its own seed)."""
        meta = self._gather((self.me.student_dp, [len(p) for p in prompts], seed))
        lengths, seeds = {}, {}
        for d, sizes, s in meta:
            lengths.setdefault(d, sizes)
            seeds.setdefault(d, s)
        work = self._work({d: len(s) for d, s in lengths.items()})
        own = [ids.tolist() for ids in self._to_groups(
            work, lambda item: torch.tensor(prompts[item[1]], dtype=torch.long),
            lambda item: lengths[item[0]][item[1]], torch.long)]
        group_seed = stream_seed(seeds[0], "teacher_group", group=self.me.teacher_dp)
        results = generator.generate(own, sampling, seed=group_seed) if own else []
        # generated tokens and their log-probs back, as int64 (log-probs bit-cast from float64)
        done = {}
        for g, n in self._gather((self.me.teacher_dp, [len(r.tokens) for r in results])):
            done.setdefault(g, n)

        def tokens_and_logprobs(index):
            r = results[index]
            return torch.cat([torch.tensor(r.tokens, dtype=torch.long),
                              torch.tensor(r.logprobs, dtype=torch.float64).view(torch.long)])

        out = []
        for flat in self._to_holders(work, tokens_and_logprobs, lambda g, index, item: 2 * done[g][index],
                                     torch.long, last_stage=False):
            tokens, logprobs = flat.cpu().chunk(2)
            tokens = tokens.tolist()
            out.append(Generation(tokens, logprobs.contiguous().view(torch.float64).tolist(),
                                  bool(tokens) and tokens[-1] == generator.eos_id))
        return out


def _same_shape(batches: list[MicroBatch]) -> list[MicroBatch]:
    """The micro-batches padded to one [B, S] at the end of rows and columns (padding positions
    come after every real one in their row, so a causal model's outputs at the real ones are
    unchanged; packed rows give it segment 0, as to_microbatches does)."""
    B = max((mb.tokens.shape[0] for mb in batches), default=0)
    S = max((mb.tokens.shape[1] for mb in batches), default=0)

    def pad(t):
        return torch.nn.functional.pad(t, (0, S - t.shape[1], 0, B - t.shape[0])) if t is not None else None

    return [MicroBatch(pad(mb.tokens), pad(mb.labels), pad(mb.loss_mask), segments=pad(mb.segments)) for mb in batches]


def _crop(signal: TeacherSignal, shape) -> TeacherSignal:
    B, S = shape
    return TeacherSignal(**{f.name: getattr(signal, f.name)[:B, :S].contiguous() for f in fields(TeacherSignal)})


class LayoutTeacher:
    """The teacher model on its own layout, as ``train_step`` takes it: scores through ``layout``."""

    def __init__(self, model, layout: TeacherLayout):
        self.model, self.layout = model, layout

    def outputs(self, microbatches: list[MicroBatch], *, topk: int, dense: bool, vocab_size: int,
                end_tokens=None) -> list:
        if dense:
            raise ValueError("dense teacher logits cannot move between layouts (a vocabulary row a token): "
                             "the teacher needs the student's parallel layout for teacher_input='logits'")
        return self.layout.signals(self.model, microbatches, topk=topk, vocab_size=vocab_size, end_tokens=end_tokens)


class LayoutGenerator:
    """The teacher's Generator on its own layout, as ``collect_rollouts`` takes it (prefixes)."""

    def __init__(self, generator: Generator, layout: TeacherLayout):
        self.generator, self.layout = generator, layout
        self.eos_id, self.name = generator.eos_id, generator.name

    def generate(self, prompts: list, sampling: SamplingConfig, *, seed: int = 0,
                 max_new_tokens: list | None = None) -> list[Generation]:
        if max_new_tokens is not None:
            raise ValueError("per-prompt budgets are not routed between layouts; teacher prefixes use one budget")
        return self.layout.generate(self.generator, prompts, sampling, seed=seed)

    @property
    def stats(self):
        return self.generator.stats

    def release(self) -> None:
        self.generator.release()

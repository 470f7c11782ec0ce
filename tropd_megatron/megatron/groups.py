"""A model's process groups. The student's are Megatron's global ones (``parallel_state``);
a teacher on a layout of its own gets a ``ProcessGroupCollection`` built with megatron-core's
``HyperCommGrid`` in Megatron's default rank order (tensor fastest, then data, then pipeline:
``tp-cp-dp-pp``), the way megatron-core's RL code builds its inference model's groups.

Everything on the teacher's path reads its groups from here (the model's ``pg_collection``),
never from ``parallel_state``, which holds the student's.
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection


class ModelGroups:
    """One model's process groups on this rank (a ``ProcessGroupCollection``) and its place in them."""

    def __init__(self, pgs: ProcessGroupCollection):
        self.pgs = pgs

    @classmethod
    def of(cls, model) -> "ModelGroups":
        """The groups a GPTModel was built on (Megatron's global ones when it was given none)."""
        return cls(getattr(model, "module", model).pg_collection)

    @classmethod
    def megatron(cls) -> "ModelGroups":
        """Megatron's global groups (``parallel_state``): the student's."""
        return cls(ProcessGroupCollection.use_mpu_process_groups())

    @property
    def tensor(self) -> int:
        return self.pgs.tp.size()

    @property
    def pipeline(self) -> int:
        return self.pgs.pp.size()

    @property
    def data(self) -> int:
        return self.pgs.dp.size()

    @property
    def tp_rank(self) -> int:
        return self.pgs.tp.rank()

    @property
    def pp_rank(self) -> int:
        return self.pgs.pp.rank()

    @property
    def dp_rank(self) -> int:
        return self.pgs.dp.rank()

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pipeline - 1


_BUILT: dict = {}  # (tensor, pipeline) -> ModelGroups: process groups are made once per job


def layout_groups(tensor: int, pipeline: int) -> ModelGroups:
    """Groups for a model at ``tensor`` x ``pipeline`` over the whole world (data parallel for
    the rest). Collective on first use for a layout: every rank must call it in the same order."""
    key = (tensor, pipeline, dist.get_world_size())
    if key not in _BUILT:
        world = dist.get_world_size()
        if world % (tensor * pipeline):
            raise ValueError(f"world size {world} is not divisible by tensor x pipeline = {tensor} x {pipeline}")
        grid = HyperCommGrid([tensor, 1, 1, world // (tensor * pipeline), pipeline], ["tp", "cp", "ep", "dp", "pp"])
        pgs = ProcessGroupCollection()
        pgs.tp, pgs.cp, pgs.ep, pgs.dp, pgs.pp = (grid.create_pg(d) for d in ("tp", "cp", "ep", "dp", "pp"))
        # a dense model's expert groups (the dynamic engine reads them): expert TP = TP, EP = 1
        pgs.expt_tp, pgs.expt_dp, pgs.tp_ep = pgs.tp, pgs.dp, grid.create_pg(["tp", "ep"])
        pgs.mp = grid.create_pg(["tp", "pp"])
        pgs.tp_cp = grid.create_pg(["tp", "cp"])
        pgs.dp_cp = grid.create_pg(["cp", "dp"])
        pgs.tp_dp_cp = grid.create_pg(["tp", "cp", "dp"])
        pgs.embd = pgs.pos_embd = None  # set below on the ranks that hold them
        rank = dist.get_rank()
        for stages in grid.get_rank_enum("pp"):  # the embedding lives on the first and last stage
            for name, ranks in (("embd", sorted({stages[0], stages[-1]})), ("pos_embd", [stages[0]])):
                group = dist.new_group(ranks)
                if rank in ranks:
                    setattr(pgs, name, group)
        _BUILT[key] = ModelGroups(pgs)
    return _BUILT[key]

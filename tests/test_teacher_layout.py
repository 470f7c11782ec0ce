"""The teacher on a parallel layout of its own (4 gloo processes): the training step, teacher
prefixes and a full iteration equal the same-layout teacher's on the same rollouts.

Weights are made identical across layouts the way a user's job does it: one checkpoint of
each model, loaded at every layout (the teacher's at its own). Each student data-parallel
rank gets its own rollouts, of different counts and lengths (so the teacher groups' shares
cut across student ranks), with teacher prefixes, packed rows and TrOPD's stochastic trust mask.
"""
import os
import random

import numpy as np
import pytest
import torch

from distributed import run_workers

pytest.importorskip("megatron.core")

from tropd_megatron.megatron import OptimConfig, ParallelConfig, build_gpt, build_student, initialize, train_step  # noqa: E402
from tropd_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from tropd_megatron.megatron.groups import ModelGroups  # noqa: E402
from tropd_megatron.megatron.rollout import Rollout, to_microbatches  # noqa: E402
from tropd_megatron.megatron.teacher_layout import LayoutTeacher, TeacherLayout, teacher_groups  # noqa: E402
from step_models import OBJECTIVE, STUDENT, TEACHER, VOCAB  # noqa: E402

WORLD = 4
ROW_TOKENS = 15
RTOL, ATOL = 1e-5, 1e-6
METRICS = ("loss", "tokens", "kl_k1", "kl_k3", "trust_fraction", "student_entropy", "teacher_entropy", "prefix_tokens")


def rollouts_of(d: int) -> list[Rollout]:
    """Student rank d's rollouts: 3 + 2d of them (so ranks hold different micro-batch counts),
    every third one with a teacher prefix."""
    rng = random.Random(d)
    out = []
    for i in range(3 + 2 * d):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 4))]
        prefix = [rng.randrange(VOCAB) for _ in range(2)] if i % 3 == 0 else []
        continuation = [rng.randrange(VOCAB) for _ in range(rng.randint(1, ROW_TOKENS + 1 - len(prompt) - len(prefix)))]
        out.append(Rollout(prompt, prefix, continuation, [0.0] * len(continuation), False))
    return out


def _init_worker(rank, world, root):
    initialize(ParallelConfig(1, 1), seed=0)
    save_checkpoint(os.path.join(root, "teacher"), 0, build_gpt(TEACHER, ParallelConfig(1, 1), frozen=True))
    save_checkpoint(os.path.join(root, "student"), 0, build_student(STUDENT, ParallelConfig(1, 1), OptimConfig(
        optimizer="sgd"), total_steps=2).model.module)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    run_workers(_init_worker, 1, root)
    return root


def _setup(root, student_layout, teacher_layout):
    """(student, the teacher as train_step takes it, its GPTModel) with both checkpoints loaded."""
    student_parallel, teacher_parallel = ParallelConfig(*student_layout), ParallelConfig(*teacher_layout)
    initialize(student_parallel, seed=0)
    groups = teacher_groups(student_parallel, teacher_parallel)
    gpt = build_gpt(TEACHER, teacher_parallel, frozen=True, groups=groups)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), gpt)
    student = build_student(STUDENT, student_parallel, OptimConfig(optimizer="sgd", lr=0.5, clip_grad=0.0),
                            total_steps=2)
    load_checkpoint(latest_checkpoint(os.path.join(root, "student")), student.model.module)
    teacher = gpt if groups is None else LayoutTeacher(gpt, TeacherLayout(ModelGroups.megatron(), groups))
    return student, teacher, gpt


def _step_worker(rank, world, root, student_layout, teacher_layout):
    from megatron.core import parallel_state

    student, teacher, _ = _setup(root, student_layout, teacher_layout)
    d = parallel_state.get_data_parallel_rank()
    batches = to_microbatches(rollouts_of(d), 2, 0, pack=True, row_tokens=ROW_TOKENS,
                              same_shape=student_layout[1] > 1)
    result = train_step(student, teacher, batches, OBJECTIVE, vocab_size=VOCAB, step=0, total_steps=2)
    name = f"after_s{student_layout}_t{teacher_layout}".replace(" ", "")
    save_checkpoint(os.path.join(root, name), 1, student.model.module)
    return dict(metrics=result.metrics, path=os.path.join(root, name, "step_00000001"))


def _read_worker(rank, world, path):
    initialize(ParallelConfig(1, 1), seed=0)
    model = build_gpt(STUDENT, ParallelConfig(1, 1))
    load_checkpoint(path, model)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


@pytest.mark.parametrize("student_layout,teacher_layout", [
    ((1, 1), (4, 1)),  # the 70B-style case: teacher TP 4, student TP 1 x DP 4
    ((1, 1), (2, 1)),  # teacher TP 2 x DP 2, student TP 1 x DP 4
    ((2, 1), (1, 1)),  # teacher TP 1 x DP 4, student TP 2 x DP 2
    ((2, 1), (1, 2)),  # teacher PP 2 x DP 2, student TP 2 x DP 2 (PP 1)
])
def test_step_equals_the_same_layout_teacher(initial, student_layout, teacher_layout):
    """Loss, every metric and the parameter update (SGD: the gradient) at 1e-5."""
    reference = run_workers(_step_worker, WORLD, initial, student_layout, student_layout, timeout=180)
    got = run_workers(_step_worker, WORLD, initial, student_layout, teacher_layout, timeout=180)
    want, have = reference[-1]["metrics"], got[-1]["metrics"]  # a last student stage: metrics reduced over DP
    assert want["tokens"] > 30 and 0 < want["trust_fraction"] < 1 and want["prefix_tokens"] > 0, want
    assert set(have) == set(want)
    for key in want:
        np.testing.assert_allclose(have[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)
    before = run_workers(_read_worker, 1, os.path.join(initial, "student", "step_00000000"))[0]
    expected = run_workers(_read_worker, 1, reference[0]["path"])[0]
    updated = run_workers(_read_worker, 1, got[0]["path"])[0]
    assert sum(float(np.abs(expected[k] - before[k]).max()) for k in expected) > 1e-3, "the step must move weights"
    for k in expected:
        np.testing.assert_allclose(updated[k] - before[k], expected[k] - before[k], rtol=RTOL, atol=ATOL,
                                   err_msg=f"update of {k}")

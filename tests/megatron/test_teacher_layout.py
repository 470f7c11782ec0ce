"""The teacher on a parallel layout of its own (4 gloo processes): the training step, teacher
prefixes and a full iteration equal the same-layout teacher's on the same rollouts.

Weights are made identical across layouts the way a user's job does it: one checkpoint of
each model, loaded at every layout (the teacher's at its own). Each student data-parallel
rank gets its own rollouts, of different counts and lengths (so the teacher groups' shares
cut across student ranks), with teacher prefixes, packed rows and TrOPD's stochastic trust mask.
"""
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from support.distributed import free_port, run_workers
from support.tiny_files import make_tiny_files
from tropd_megatron.logs import read_metrics
from support import REPO

pytest.importorskip("megatron.core")

from tropd_megatron.megatron import (  # noqa: E402
    OptimConfig, ParallelConfig, build_gpt, build_student, initialize, train_step)
from tropd_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from tropd_megatron.megatron.groups import ModelGroups  # noqa: E402
from tropd_megatron.megatron.inference import EngineConfig, Generator, SamplingConfig  # noqa: E402
from tropd_megatron.megatron.rollout import Rollout, to_microbatches  # noqa: E402
from tropd_megatron.megatron.teacher_layout import (  # noqa: E402
    LayoutGenerator, LayoutTeacher, TeacherLayout, teacher_groups)
from support.step_models import OBJECTIVE, STUDENT, TEACHER, VOCAB  # noqa: E402

ROOT = REPO
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


def _prefix_worker(rank, world, root, student_layout, teacher_layout, eos):
    """Greedy teacher prefixes of this student rank's prompts; ``eos`` None: pick as the end
    token the teacher's most frequent greedy token (so that some prefixes stop early)."""
    from megatron.core import parallel_state

    _, _, gpt = _setup(root, student_layout, teacher_layout)
    groups = teacher_groups(ParallelConfig(*student_layout), ParallelConfig(*teacher_layout))
    prompts = [r.prompt for r in rollouts_of(parallel_state.get_data_parallel_rank())]
    greedy = SamplingConfig(top_k=1, max_new_tokens=5)

    def generator(end):
        engine = EngineConfig(max_requests=4, kv_cache_gib=0.01)
        gen = Generator(gpt, TEACHER, eos_id=end, engine=engine, name="teacher")
        return gen if groups is None else LayoutGenerator(gen, TeacherLayout(ModelGroups.megatron(), groups))

    if eos is None:
        tokens = [t for g in generator(VOCAB - 1).generate(prompts, greedy) for t in g.tokens]
        counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB)
        torch.distributed.all_reduce(counts)  # one end token for every rank
        eos = int(counts.argmax())
    out = generator(eos).generate(prompts, greedy, seed=5)
    return dict(eos=eos, tokens=[g.tokens for g in out], logprobs=[g.logprobs for g in out],
                stopped=[g.stopped for g in out])


@pytest.mark.parametrize("student_layout,teacher_layout", [((1, 1), (4, 1)), ((2, 1), (1, 2))])
def test_teacher_prefixes_equal_the_same_layout_teachers(initial, student_layout, teacher_layout):
    """Greedy prefixes written at the teacher's own layout (its engine, its groups) are the
    same-layout teacher's, with their log-probs and stop flags, for every student rank."""
    reference = run_workers(_prefix_worker, WORLD, initial, student_layout, student_layout, None, timeout=180)
    eos = reference[0]["eos"]
    got = run_workers(_prefix_worker, WORLD, initial, student_layout, teacher_layout, eos, timeout=180)
    stops = [s for r in reference for s in r["stopped"]]
    assert any(stops) and not all(stops), "some prefixes must stop on the end token, some run to the budget"
    for want, have in zip(reference, got):
        assert have["tokens"] == want["tokens"] and have["stopped"] == want["stopped"]
        for a, b in zip(have["logprobs"], want["logprobs"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _train(overrides, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-port",
           str(free_port()), "-m", "launch.train", "--recipe", "tiny", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


@pytest.mark.timeout(420)
def test_training_and_a_resume_that_changes_the_teachers_layout(tmp_path):
    """launch.train on 4 processes: the student at TP 1 x DP 4, the teacher at TP 2 x DP 2
    writing greedy prefixes for half the rollouts; resumed from step 2 with the teacher at TP 4,
    the last step equals the uninterrupted run's."""
    guided = ["rollout.prefix_share_start=0.5", "rollout.prefix_share_end=0.5", "rollout.prefix_tokens_start=4",
              "rollout.prefix_tokens_end=4", "rollout.sampling.top_k=1"]
    base = make_tiny_files(tmp_path) + guided + ["parallel.tensor=1", "eval.path=null", "schedule.steps=3",
                                                 "checkpoint.save_every=1", "checkpoint.keep_last=0"]
    log = _train(base + ["teacher.parallel.tensor=2"], tmp_path)
    assert "teacher at its own layout: tensor 2 x pipeline 1 x data 2; student: tensor 1 x pipeline 1 x data 4" in log
    straight = read_metrics(tmp_path / "run")
    assert all(straight[s]["prefix_tokens"] > 0 and 0 < straight[s]["prefixed_fraction"] for s in (1, 2, 3))
    shutil.rmtree(tmp_path / "run" / "step_00000003")
    (tmp_path / "run" / "latest").write_text("step_00000002")
    log = _train(base + ["teacher.parallel.tensor=4"], tmp_path)
    assert "at step 2" in log and "teacher at its own layout: tensor 4 x pipeline 1 x data 1" in log
    resumed = read_metrics(tmp_path / "run")[3]
    for key in ("loss", "tokens", "kl_k1", "trust_fraction", "prefix_tokens", "response_tokens", "grad_norm"):
        np.testing.assert_allclose(resumed[key], straight[3][key], rtol=1e-4, err_msg=key)


def test_a_bad_teacher_layout_is_refused_before_loading(tmp_path):
    """A teacher TP that does not divide its heads, named by key before any file is read."""
    cmd = [sys.executable, "-m", "launch.train", "--recipe", "tiny", "tokenizer=/nonexistent.model",
           "teacher.parallel.tensor=8"]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert out.returncode == 2, out.stderr[-2000:]
    assert ("teacher.model at teacher.parallel.tensor=8 x pipeline=1: tensor parallel size 8 does not divide"
            in out.stderr)

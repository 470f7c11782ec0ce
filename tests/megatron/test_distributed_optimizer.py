"""Megatron's distributed optimizer (Adam's fp32 state sharded over data-parallel ranks),
the GPU recipes' optimizer, on CPU: it follows the plain optimizer's trajectory at DP = 2 and
DP = 2 x TP = 2, a skipped update leaves its sharded state bitwise untouched, and its
checkpoint saved at DP = 2 resumes at DP = 1 on the same trajectory; a checkpoint resumes at
another TP layout only in the fully reshardable format, and says so otherwise."""
import json
import os

import numpy as np
import pytest
import torch

from support.distributed import run_workers

pytest.importorskip("megatron.core")

from support.step_models import OBJECTIVE, STUDENT, TEACHER, VOCAB, random_microbatches  # noqa: E402
from tropd_megatron.megatron import OptimConfig, ParallelConfig, build_gpt, build_student  # noqa: E402
from tropd_megatron.megatron import initialize, train_step  # noqa: E402
from tropd_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402

STEPS = 3
LR = 1e-2
# The data- and tensor-parallel splits change the gradients' summation order. Adam's update
# lr * m / (sqrt(v) + eps) turns that rounding into up to lr in an element whose gradient is
# near zero: with Megatron's eps of 1e-8, one element moved 2.6e-5 on an AMD EPYC and 3.5e-5
# here under ATEN_CPU_CAPABILITY=avx2. An eps of 1e-3 bounds the update's sensitivity to
# lr / eps per unit of gradient and still lets Adam normalise the larger gradients (the
# weights move by 0.05 to 0.5 lr a step): measured differences then stay under 5e-7 with
# AVX-512 and AVX2 kernels, while a wrong shard, state or reduction moves weights by O(lr),
# 10^3 x ATOL. Gradient norms are compared too: Adam and clipping hide a gradient scaled as a
# whole.
ADAM_EPS = 1e-3
ATOL = 1e-3 * LR
NORM_RTOL = 1e-5


def batches(step):
    """Four micro-batches of a step (data-parallel ranks take their share)."""
    return random_microbatches(200 + step, 4)


def _setup(root, tp, distributed):
    from megatron.core import parallel_state

    initialize(ParallelConfig(tp, 1), seed=0)
    teacher = build_gpt(TEACHER, ParallelConfig(tp, 1), frozen=True)
    optim = OptimConfig(lr=LR, weight_decay=0.1, clip_grad=1.0, adam_eps=ADAM_EPS, distributed_optimizer=distributed)
    student = build_student(STUDENT, ParallelConfig(tp, 1), optim, total_steps=2 * STEPS)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), teacher)
    load_checkpoint(latest_checkpoint(os.path.join(root, "student")), student.model.module)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    return teacher, student, lambda step: batches(step)[rank::dp]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)
            and not k.endswith("_extra_state")}


def _init_worker(rank, world, root):
    initialize(ParallelConfig(), seed=0)
    save_checkpoint(os.path.join(root, "teacher"), 0, build_gpt(TEACHER, ParallelConfig(), frozen=True))
    save_checkpoint(os.path.join(root, "student"), 0, build_gpt(STUDENT, ParallelConfig()))


def _trajectory_worker(rank, world, root, tp, distributed, name, start=0, stop=STEPS, save_at=None, fmt=None,
                       started=False):
    """Adam steps start..stop; resume from ``name`` when start > 0; save at ``save_at``;
    the final weights saved as ``name``_final. ``started``: Adam's state created up front
    (start_optimizer_state, as the trainer does), checked to be zero moments at step 0."""
    from tropd_megatron.megatron.checkpoint import _torch_optimizers, start_optimizer_state

    teacher, student, mine = _setup(root, tp, distributed)
    if started:
        start_optimizer_state(student.optimizer)
        for inner in _torch_optimizers(student.optimizer):
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    folder = os.path.join(root, name)
    if start:
        load_checkpoint(latest_checkpoint(folder), student.model.module, student.optimizer, student.scheduler)
    norms = []
    for step in range(start, stop):
        result = train_step(student, teacher, mine(step), OBJECTIVE, vocab_size=VOCAB, step=step,
                            total_steps=2 * STEPS)
        norms.append(result.grad_norm)
        if step + 1 == save_at:
            save_checkpoint(folder, step + 1, student.model.module, student.optimizer, student.scheduler,
                            optimizer_format=fmt or "dp_reshardable")
    save_checkpoint(os.path.join(root, f"{name}_final"), stop, student.model.module)
    return norms


def _read_worker(rank, world, path):
    initialize(ParallelConfig(), seed=0)
    model = build_gpt(STUDENT, ParallelConfig())
    load_checkpoint(path, model)
    return {k: v.numpy() for k, v in _weights(model).items()}


def final(root, name, step=STEPS):
    return run_workers(_read_worker, 1, os.path.join(root, f"{name}_final", f"step_{step:08d}"))[0]


def assert_same(a, b, what):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=ATOL, err_msg=f"{what}: {k}")


def assert_same_norms(a, b, what):
    np.testing.assert_allclose(a, b, rtol=NORM_RTOL, atol=0, err_msg=f"{what}: gradient norms by step")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("distopt"))
    run_workers(_init_worker, 1, path)
    norms = run_workers(_trajectory_worker, 1, path, 1, False, "plain")[0]  # the reference: plain Adam, one rank
    with open(os.path.join(path, "plain_norms.json"), "w") as f:
        json.dump([float(n) for n in norms], f)
    return path


def plain_norms(root):
    with open(os.path.join(root, "plain_norms.json")) as f:
        return json.load(f)


@pytest.mark.timeout(300)
def test_the_distributed_optimizer_follows_the_plain_one(root):
    """Three Adam steps (weight decay, clipping) at DP = 2 and DP = 2 x TP = 2 with the
    distributed optimizer give the plain optimizer's weights on one rank."""
    reference = final(root, "plain")
    start = run_workers(_read_worker, 1, os.path.join(root, "student", "step_00000000"))[0]
    assert max(float(np.abs(reference[k] - start[k]).max()) for k in start) > 1e-3  # the steps move the weights
    for tp, world in ((1, 2), (2, 4)):
        norms = run_workers(_trajectory_worker, world, root, tp, True, f"dist_tp{tp}_dp2", timeout=150)[0]
        assert_same_norms(norms, plain_norms(root), f"distributed TP={tp} DP=2")
        assert_same(final(root, f"dist_tp{tp}_dp2"), reference, f"distributed TP={tp} DP=2")


@pytest.mark.timeout(300)
def test_adam_state_created_before_the_first_update_changes_nothing(root):
    """The trainer creates Adam's moments before the first rollout (so that a KV cache sized
    from the free memory leaves room for them): the same trajectory, to the bit, at DP = 2 with
    the distributed optimizer."""
    lazy = run_workers(_trajectory_worker, 2, root, 1, True, "lazy_state", timeout=150)[0]
    early = run_workers(_trajectory_worker, 2, root, 1, True, "early_state", 0, STEPS, None, None, True,
                        timeout=150)[0]
    assert lazy == early
    a, b = final(root, "lazy_state"), final(root, "early_state")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _skip_worker(rank, world, root):
    """An applied step, then one with a NaN gradient on one rank: skipped, with every rank's
    shard of Adam's state and the weights bitwise as before; then the next step applies."""
    from tropd_megatron.megatron.checkpoint import _torch_optimizers

    teacher, student, mine = _setup(root, 1, True)
    train_step(student, teacher, mine(0), OBJECTIVE, vocab_size=VOCAB, step=0, total_steps=2 * STEPS)

    def state():
        return [{k: v.clone() for k, v in s.items()} for inner in _torch_optimizers(student.optimizer)
                for s in inner.state.values()]

    before_state, before_weights = state(), _weights(student.model.module)
    poison = student.model.module.output_layer.register_forward_hook(
        lambda m, i, o: (o[0] * float("nan"), o[1]) if rank == 1 else o)
    bad = train_step(student, teacher, mine(1), OBJECTIVE, vocab_size=VOCAB, step=1, total_steps=2 * STEPS)
    poison.remove()
    same_state = all(torch.equal(a[k], b[k]) for a, b in zip(before_state, state()) for k in a)
    same_weights = all(torch.equal(v, before_weights[k]) for k, v in _weights(student.model.module).items())
    good = train_step(student, teacher, mine(2), OBJECTIVE, vocab_size=VOCAB, step=2, total_steps=2 * STEPS)
    return bad.skipped, bad.skip_reason, same_state, same_weights, len(before_state) > 0, good.skipped


def test_a_skipped_update_leaves_the_sharded_state_untouched(root):
    for skipped, reason, same_state, same_weights, has_state, good_skipped in run_workers(_skip_worker, 2, root):
        assert skipped and reason == "non-finite gradients" and has_state
        assert same_state and same_weights and not good_skipped


@pytest.mark.timeout(300)
def test_a_checkpoint_saved_at_dp2_resumes_at_dp1_on_the_same_trajectory(root):
    """One step at DP = 2, saved (each rank's shard, no gather); two more at DP = 1 from it:
    the weights of three uninterrupted steps."""
    first = run_workers(_trajectory_worker, 2, root, 1, True, "dp2_to_dp1", 0, 1, 1)[0]
    rest = run_workers(_trajectory_worker, 1, root, 1, True, "dp2_to_dp1", 1, STEPS)[0]
    assert_same_norms(list(first) + list(rest), plain_norms(root), "saved at DP=2, resumed at DP=1")
    assert_same(final(root, "dp2_to_dp1"), final(root, "plain"), "saved at DP=2, resumed at DP=1")


def _layout_worker(rank, world, root, name):
    teacher, student, mine = _setup(root, 1, True)
    try:
        load_checkpoint(latest_checkpoint(os.path.join(root, name)), student.model.module, student.optimizer,
                        student.scheduler)
    except ValueError as e:
        return str(e)
    for step in range(1, STEPS):
        train_step(student, teacher, mine(step), OBJECTIVE, vocab_size=VOCAB, step=step, total_steps=2 * STEPS)
    save_checkpoint(os.path.join(root, f"{name}_final"), STEPS, student.model.module)
    return ""


@pytest.mark.timeout(300)
def test_another_tensor_parallel_layout_needs_the_fully_reshardable_format(root):
    """Saved at TP = 2: the default format is refused at TP = 1 with the reason and the way
    out; the fully reshardable one resumes there on the same trajectory."""
    for fmt in ("dp_reshardable", "fully_reshardable"):
        run_workers(_trajectory_worker, 2, root, 2, True, f"tp2_{fmt}", 0, 1, 1, fmt)
    refused = run_workers(_layout_worker, 1, root, "tp2_dp_reshardable")[0]
    assert "saved at tensor 2 x pipeline 1 (checkpoint.optimizer_format=dp_reshardable)" in refused
    assert "this run is tensor 1 x pipeline 1" in refused and "fully_reshardable" in refused
    assert run_workers(_layout_worker, 1, root, "tp2_fully_reshardable")[0] == ""
    assert_same(final(root, "tp2_fully_reshardable"), final(root, "plain"), "saved at TP=2, resumed at TP=1")

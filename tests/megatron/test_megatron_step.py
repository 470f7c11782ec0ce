"""The Megatron student + co-located frozen teacher training step on CPU (gloo): TP / PP
parity with TP = 1, a frozen teacher, checkpoints (resume, resharding, killed saves).

Every run happens in fork-started workers (a fresh megatron parallel state each time).
Weights are made identical across layouts the way a user's job does it: one checkpoint,
loaded at every TP / PP layout.
"""
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

from support.distributed import run_workers
from tropd_megatron.losses import DenseKLConfig, SFTConfig

pytest.importorskip("megatron.core")

from tropd_megatron.megatron import (  # noqa: E402
    MicroBatch,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    build_gpt,
    build_student,
    initialize,
    shared_vocabulary_rows,
    train_step,
)
from tropd_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from tropd_megatron.megatron.step import SpikeGuard  # noqa: E402
from support.step_models import OBJECTIVE, STUDENT, TEACHER, VOCAB, random_microbatches  # noqa: E402

STEPS = 3
# Parity tolerance: TP / PP change fp32 summation order (matmul splits, all-reduces).
RTOL, ATOL = 1e-4, 1e-6


def microbatches(step):
    return random_microbatches(100 + step, 2)


def state_of(model):
    """The full (unsharded) parameters as numpy, gathered by loading at TP = 1 elsewhere."""
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items() if torch.is_tensor(v)
            and not k.endswith("_extra_state")}


def _setup(tp, pp, optimizer="sgd", lr=0.5, sp=False):
    parallel = ParallelConfig(tp, pp, sequence_parallel=sp)
    initialize(parallel, seed=0)
    teacher = build_gpt(TEACHER, parallel, frozen=True)
    student = build_student(STUDENT, parallel, OptimConfig(optimizer=optimizer, lr=lr, clip_grad=0.0),
                            total_steps=STEPS)
    return teacher, student


def _init_worker(rank, world, root):
    teacher, student = _setup(1, 1)
    save_checkpoint(os.path.join(root, "teacher"), 0, teacher)
    save_checkpoint(os.path.join(root, "student"), 0, student.model.module)


def _parity_worker(rank, world, root, tp, pp, mode="tropd", sp=False):
    from megatron.core import parallel_state

    teacher, student = _setup(tp, pp, sp=sp)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), teacher)
    load_checkpoint(latest_checkpoint(os.path.join(root, "student")), student.model.module)
    batches = microbatches(0)
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1:  # each data-parallel rank holds its share of the micro-batches
        batches = batches[parallel_state.get_data_parallel_rank()::dp]
    objective = {"tropd": OBJECTIVE, "dense": DenseKLConfig("reverse"), "sft": SFTConfig()}[mode]
    result = train_step(student, None if mode == "sft" else teacher, batches, objective, vocab_size=VOCAB, step=0,
                        total_steps=STEPS, dense=mode == "dense")
    save_checkpoint(os.path.join(root, f"after_tp{tp}pp{pp}dp{dp}{'sp' if sp else ''}_{mode}"), 1, student.model.module)
    return result.metrics


def _read_worker(rank, world, path):
    initialize(ParallelConfig(1, 1), seed=0)
    model = build_gpt(STUDENT, ParallelConfig(1, 1))
    load_checkpoint(path, model)
    return state_of(model)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("megatron"))
    run_workers(_init_worker, 1, root)
    return root


@pytest.mark.parametrize("mode", ["tropd", "dense", "sft"])
def test_tp_pp_dp_steps_match_tp1(initial, mode):
    """One step at TP = 2, TP = 2 x PP = 2, DP = 2, and TP = 2 (x PP = 2) with sequence
    parallelism gives TP = 1's loss, metrics and parameter update (SGD, so the update is the
    gradient). Compact teacher signal with TrOPD,
    the dense mode (teacher logits handed to the loss) with reverse KL, and supervised
    fine-tuning with no teacher."""
    suffix = "_" + mode
    reference = run_workers(_parity_worker, 1, initial, 1, 1, mode)[0]
    expected = run_workers(_read_worker, 1, os.path.join(initial, f"after_tp1pp1dp1{suffix}", "step_00000001"))[0]
    before = run_workers(_read_worker, 1, os.path.join(initial, "student", "step_00000000"))[0]
    assert reference["tokens"] == 24 and (mode != "tropd" or 0 < reference["trust_fraction"] < 1)
    moved = sum(float(np.abs(expected[k] - before[k]).max()) for k in expected)
    assert moved > 1e-3, "the step must change the student"
    for tp, pp, dp, sp in ((2, 1, 1, False), (2, 2, 1, False), (1, 1, 2, False), (2, 1, 1, True), (2, 2, 1, True)):
        what = f"TP={tp} PP={pp} DP={dp}{' SP' if sp else ''}{suffix}"
        ranks = run_workers(_parity_worker, tp * pp * dp, initial, tp, pp, mode, sp)
        last = ranks[-1]  # a last pipeline stage; metrics are reduced over data-parallel ranks
        for key in ("loss", "tokens", "kl_k1", "kl_k3", "trust_fraction", "student_entropy", "teacher_entropy"):
            if key not in reference:  # supervised fine-tuning logs loss and tokens only
                continue
            np.testing.assert_allclose(last[key], reference[key], rtol=RTOL, atol=ATOL, err_msg=f"{what} {key}")
        got = run_workers(_read_worker, 1, os.path.join(initial, f"after_tp{tp}pp{pp}dp{dp}{'sp' if sp else ''}{suffix}",
                                                        "step_00000001"))[0]
        for k in expected:
            np.testing.assert_allclose(got[k] - before[k], expected[k] - before[k], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{what} update of {k}")


def _frozen_worker(rank, world, root):
    teacher, student = _setup(2, 1, optimizer="adam", lr=1e-2)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
    for step in range(STEPS):
        train_step(student, teacher, microbatches(step), OBJECTIVE, vocab_size=VOCAB, step=step, total_steps=STEPS)
    optimized = {id(p) for group in student.optimizer.param_groups for p in group["params"]}
    return dict(
        unchanged=all(torch.equal(before[k], v) for k, v in teacher.state_dict().items() if torch.is_tensor(v)),
        no_grads=all(p.grad is None and not p.requires_grad for p in teacher.parameters()),
        not_optimized=not any(id(p) in optimized for p in teacher.parameters()),
        eval_mode=not teacher.training,
    )


def test_teacher_stays_frozen(initial):
    for rank in run_workers(_frozen_worker, 2, initial):
        assert all(rank.values()), rank


def _resume_worker(rank, world, root, run, start, stop, save_at):
    teacher, student = _setup(2, 1, optimizer="adam", lr=1e-2)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), teacher)
    ckpt = os.path.join(root, run)
    if start == 0:
        load_checkpoint(latest_checkpoint(os.path.join(root, "student")), student.model.module)
    else:
        meta = load_checkpoint(latest_checkpoint(ckpt), student.model.module, student.optimizer, student.scheduler)
        assert meta["step"] == start and meta["trainer"]["next_microbatch_seed"] == 100 + start
    for step in range(start, stop):
        train_step(student, teacher, microbatches(step), OBJECTIVE, vocab_size=VOCAB, step=step, total_steps=STEPS)
        if step + 1 == save_at:
            save_checkpoint(ckpt, step + 1, student.model.module, student.optimizer, student.scheduler,
                            trainer_state={"next_microbatch_seed": 100 + step + 1})
    save_checkpoint(os.path.join(root, run + "_final"), stop, student.model.module)
    return student.optimizer.param_groups[0]["lr"]


def test_save_load_step_equals_uninterrupted(initial):
    lr_straight = run_workers(_resume_worker, 2, initial, "straight", 0, STEPS, None)[0]
    run_workers(_resume_worker, 2, initial, "resumed", 0, 1, 1)  # stops after saving step 1
    lr_resumed = run_workers(_resume_worker, 2, initial, "resumed", 1, STEPS, None)[0]
    assert lr_straight == lr_resumed
    a = run_workers(_read_worker, 1, os.path.join(initial, "straight_final", f"step_{STEPS:08d}"))[0]
    b = run_workers(_read_worker, 1, os.path.join(initial, "resumed_final", f"step_{STEPS:08d}"))[0]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise: CPU, fixed seeds and data


def _logits_worker(rank, world, root, tp, save):
    from megatron.core import parallel_state

    initialize(ParallelConfig(tp, 1), seed=7 if save else 0)
    model = build_gpt(STUDENT, ParallelConfig(tp, 1))
    path = os.path.join(root, "tp2_random")
    if save:
        save_checkpoint(path, 0, model)
    else:
        load_checkpoint(latest_checkpoint(path), model)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(*MicroBatch(tokens, tokens, torch.ones(2, 8)).model_inputs())
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)


def test_tp2_checkpoint_loads_at_tp1_with_the_same_logits(initial):
    saved = run_workers(_logits_worker, 2, initial, 2, True)[0]
    loaded = run_workers(_logits_worker, 1, initial, 1, False)[0]
    np.testing.assert_allclose(loaded, saved, rtol=1e-5, atol=1e-5)


def _killed_save_worker(rank, world, root):
    from tropd_megatron.megatron import checkpoint

    os.setsid()  # a process group of its own: the kill takes its checkpoint writer processes too
    _, student = _setup(1, 1)
    path = os.path.join(root, "killed")
    save_checkpoint(path, 1, student.model.module)

    def die(*args, **kwargs):  # the job dies after writing shards, before the rename
        os.killpg(0, signal.SIGKILL)

    checkpoint.os.rename = die
    save_checkpoint(path, 2, student.model.module)


def _after_kill_worker(rank, world, root):
    initialize(ParallelConfig(1, 1), seed=0)
    model = build_gpt(STUDENT, ParallelConfig(1, 1))
    path = os.path.join(root, "killed")
    meta = load_checkpoint(latest_checkpoint(path), model)
    save_checkpoint(path, 3, model)  # a later save clears the killed one's leftovers
    return meta["step"], sorted(os.listdir(path))


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(initial):
    with pytest.raises(AssertionError, match=r"died \(exit codes \[-9\]\)"):
        run_workers(_killed_save_worker, 1, initial)
    assert os.path.isdir(os.path.join(initial, "killed", ".incomplete_step_00000002"))
    step, entries = run_workers(_after_kill_worker, 1, initial)[0]
    assert step == 1
    assert ".incomplete_step_00000002" in entries and "step_00000003" in entries  # stale dir is harmless


def test_teacher_student_vocabulary_mismatch_is_refused():
    other = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96, vocab_size=61,
                        padded_vocab_size=64, max_sequence_length=16)
    with pytest.raises(ValueError, match=r"teacher vocabulary \(61 tokens\) differs from the student's \(60 tokens\)"):
        shared_vocabulary_rows(STUDENT, other, 1)
    # a padded teacher with an unpadded student: both get the teacher's rows, rounded up to the TP size
    student, teacher = shared_vocabulary_rows(replace(STUDENT, padded_vocab_size=None),
                                              replace(TEACHER, padded_vocab_size=66), 4)
    assert (student.embedding_rows, teacher.embedding_rows, student.vocab_size) == (68, 68, VOCAB)


def test_layouts_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide num_attention_heads=4"):
        ParallelConfig(3, 1).check(3, STUDENT)
    with pytest.raises(ValueError, match="pipeline parallel size 4 does not divide num_layers=2"):
        ParallelConfig(1, 4).check(4, STUDENT)


def _nonfinite_worker(rank, world, root):
    teacher, student = _setup(2, 1)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), teacher)
    load_checkpoint(latest_checkpoint(os.path.join(root, "student")), student.model.module)
    gpt = student.model.module
    before = {k: v.detach().clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
    poison = {"on": True}

    def hook(module, inputs, output):  # one NaN logit on one rank: NaN gradients everywhere
        logits, bias = output
        if poison["on"] and rank == 1:
            logits = logits.clone()
            logits[3, 0, 0] = float("nan")  # [S, B, V/TP] inside the output layer
        return logits, bias

    gpt.output_layer.register_forward_hook(hook)
    bad = train_step(student, teacher, microbatches(0), OBJECTIVE, vocab_size=VOCAB, step=0, total_steps=STEPS)
    after_bad = {k: v.detach().clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
    poison["on"] = False
    good = train_step(student, teacher, microbatches(1), OBJECTIVE, vocab_size=VOCAB, step=1, total_steps=STEPS)
    finite = all(bool(torch.isfinite(v).all()) for v in gpt.state_dict().values() if torch.is_tensor(v)
                 and v.is_floating_point())
    unchanged = all(torch.equal(before[k], after_bad[k]) for k in before)
    changed = any(not torch.equal(after_bad[k], v) for k, v in gpt.state_dict().items() if k in after_bad)
    return bad.skipped, bad.grad_norm, good.skipped, unchanged, changed, finite


def test_nonfinite_gradients_skip_the_update_on_every_rank(initial):
    for result in run_workers(_nonfinite_worker, 2, initial):
        bad_skipped, bad_norm, good_skipped, unchanged, changed, finite = result
        assert bad_skipped and bad_norm is None and unchanged  # both ranks skip, weights untouched
        assert not good_skipped and changed and finite  # the next clean step trains as usual


def _all_masked_worker(rank, world, root, pp, masked_ranks):
    """An applied step (Adam's momentum is non-zero), then a step whose loss masks are all
    zero on ``masked_ranks`` (data-parallel ranks at pp = 1, every stage at pp = 2)."""
    teacher, student = _setup(1, pp, optimizer="adam", lr=1e-2)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), teacher)
    load_checkpoint(latest_checkpoint(os.path.join(root, "student")), student.model.module)
    first = train_step(student, teacher, microbatches(0), OBJECTIVE, vocab_size=VOCAB, step=0, total_steps=STEPS)
    gpt = student.model.module
    before = {k: v.detach().clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
    batches = microbatches(1)
    if rank in masked_ranks:
        batches = [replace(mb, loss_mask=torch.zeros_like(mb.loss_mask)) for mb in batches]
    masked = train_step(student, teacher, batches, OBJECTIVE, vocab_size=VOCAB, step=1, total_steps=STEPS)
    unchanged = all(torch.equal(before[k], v) for k, v in gpt.state_dict().items() if k in before)
    return first.skipped, masked.skipped, masked.skip_reason, unchanged, student.scheduler.num_steps


@pytest.mark.parametrize("pp,masked_ranks,skipped", [(2, (0, 1), True), (1, (0, 1), True), (1, (0,), False)],
                         ids=["pp2-all-masked", "dp2-all-masked", "dp2-one-rank-masked"])
def test_a_step_without_loss_tokens_is_skipped_on_every_rank(initial, pp, masked_ranks, skipped):
    """Zero gradients would still move the weights through Adam's momentum: a step with no loss
    token on any rank is skipped (weights and LR schedule unchanged); one with tokens on some
    data-parallel rank trains."""
    for first_skipped, masked_skipped, reason, unchanged, scheduler_steps in run_workers(
            _all_masked_worker, 2, initial, pp, masked_ranks):
        assert not first_skipped
        assert (masked_skipped, unchanged, scheduler_steps) == (skipped, skipped, 1 if skipped else 2)
        assert reason == ("no loss tokens (every token masked)" if skipped else None)


def _spike_worker(rank, world, root, guarded):
    teacher, student = _setup(2, 1, optimizer="adam", lr=1e-2)
    load_checkpoint(latest_checkpoint(os.path.join(root, "teacher")), teacher)
    load_checkpoint(latest_checkpoint(os.path.join(root, "student")), student.model.module)
    gpt = student.model.module
    results = []
    if guarded:  # a history of tiny norms: this step's norm is a spike and is skipped
        student.spike_guard = SpikeGuard(factor=10.0, window=20, norms=[1e-9] * SpikeGuard.MIN_HISTORY)
        before = {k: v.detach().clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
        spike = train_step(student, teacher, microbatches(0), OBJECTIVE, vocab_size=VOCAB, step=0, total_steps=STEPS)
        unchanged = all(torch.equal(before[k], v) for k, v in gpt.state_dict().items() if k in before)
        results.append((spike.skipped, spike.skip_reason, spike.grad_norm, unchanged, student.scheduler.num_steps))
        student.spike_guard.norms = [1e9] * SpikeGuard.MIN_HISTORY  # now the same kind of step is no spike
    applied = train_step(student, teacher, microbatches(1), OBJECTIVE, vocab_size=VOCAB, step=1, total_steps=STEPS)
    results.append((applied.skipped, applied.grad_norm, len(student.spike_guard.norms) if guarded else None))
    return results, {k: v.detach().clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}


def test_a_gradient_norm_spike_skips_the_update_and_leaves_no_trace(initial):
    """With a spike guard, a step whose gradient norm exceeds factor x the recent median is
    skipped on both TP ranks: weights, Adam state and LR schedule as before, so the next
    applied step gives bitwise the weights of a run that never saw the spike."""
    guarded = run_workers(_spike_worker, 2, initial, True)
    plain = run_workers(_spike_worker, 2, initial, False)
    for (results, weights), (plain_results, plain_weights) in zip(guarded, plain):
        (skipped, reason, norm, unchanged, scheduler_steps), (applied_skipped, applied_norm, history) = results
        assert skipped and unchanged and scheduler_steps == 0
        assert reason.startswith(f"gradient norm {norm:.3g} > 10 x median 1e-09")
        assert not applied_skipped and history == SpikeGuard.MIN_HISTORY + 1
        assert applied_norm == plain_results[0][1]
        for k in plain_weights:
            np.testing.assert_array_equal(weights[k], plain_weights[k], err_msg=k)


def test_spike_guard_threshold_needs_history_and_keeps_a_window():
    guard = SpikeGuard(factor=4.0, window=3)
    for norm in (1.0, 2.0, 3.0, 100.0):
        guard.record(norm)
    assert guard.norms == [2.0, 3.0, 100.0] and guard.threshold() is None  # fewer than MIN_HISTORY applied
    guard = SpikeGuard(factor=4.0, window=5, norms=[1.0, 2.0, 3.0, 4.0, 50.0])
    assert guard.threshold() == 12.0  # 4 x the median: one earlier outlier does not raise the bar
    with pytest.raises(ValueError, match="spike_factor=0.5 must be > 1"):
        OptimConfig(spike_factor=0.5)
    with pytest.raises(ValueError, match=r"max_skipped_in_a_row=-1 must be >= 0 \(0: never stop\)"):
        OptimConfig(max_skipped_in_a_row=-1)


class _Payload:
    """Unpickling it creates a file: stands for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _tampered_load_worker(rank, world, folder):
    _, student = _setup(1, 1)
    try:
        load_checkpoint(folder, student.model.module)
    except ValueError as e:
        return str(e)
    return "loaded"


@pytest.mark.parametrize("part", [".metadata", "byte item", "common.pt"])
def test_a_crafted_checkpoint_runs_no_code(initial, tmp_path, part):
    """PyTorch reads ``.metadata`` with pickle.load and byte items with weights_only=False:
    a checkpoint crafted to run code on load is refused before either reads it."""
    import dataclasses
    import io
    import pickle
    import shutil

    folder = tmp_path / "step"
    shutil.copytree(os.path.join(initial, "student", "step_00000000"), folder)
    marker = tmp_path / "code_ran"
    if part == "common.pt":
        torch.save({"optimizer": _Payload(str(marker))}, folder / "common.pt")
    else:
        metadata = pickle.loads((folder / ".metadata").read_bytes())
        if part == ".metadata":
            metadata.planner_data = _Payload(str(marker))
        else:  # point one byte item at a payload appended to its shard file
            from torch.distributed.checkpoint.metadata import BytesStorageMetadata

            index = next(i for i in metadata.storage_data
                         if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
            info = metadata.storage_data[index]
            payload = io.BytesIO()
            torch.save([_Payload(str(marker))], payload)
            shard = folder / info.relative_path
            offset = shard.stat().st_size
            with open(shard, "ab") as f:
                f.write(payload.getvalue())
            metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    message = run_workers(_tampered_load_worker, 1, str(folder))[0]
    assert "refused to load" in message and not marker.exists(), message
    if part == ".metadata":  # the payload is real: plain unpickling runs it
        pickle.loads((folder / ".metadata").read_bytes())
        assert marker.exists()


def _retention_worker(rank, world, root, kill_while_deleting):
    from tropd_megatron.megatron import checkpoint

    os.setsid()
    _, student = _setup(1, 1, optimizer="adam", lr=1e-2)
    path = os.path.join(root, "kept")
    for step in range(1, 6):
        if step == 5 and kill_while_deleting:
            real = checkpoint.shutil.rmtree

            def die_midway(folder, *a, **k):  # some files gone, then the job is killed
                files = sorted(p for p in os.listdir(folder))
                for name in files[: len(files) // 2]:
                    target = os.path.join(folder, name)
                    real(target) if os.path.isdir(target) else os.remove(target)
                os.killpg(0, signal.SIGKILL)

            checkpoint.shutil.rmtree = die_midway
        save_checkpoint(path, step, student.model.module, student.optimizer, student.scheduler, keep_last=2,
                        keep_every=2)
    return sorted(os.listdir(path))


def _retention_after_kill_worker(rank, world, root):
    teacher, student = _setup(1, 1, optimizer="adam", lr=1e-2)
    path = os.path.join(root, "kept")
    meta = load_checkpoint(latest_checkpoint(path), student.model.module, student.optimizer, student.scheduler)
    save_checkpoint(path, 6, student.model.module, student.optimizer, student.scheduler, keep_last=2, keep_every=2)
    return meta["step"], sorted(os.listdir(path))


def test_old_checkpoints_are_deleted_and_a_kill_while_deleting_leaves_latest_loadable(initial, tmp_path):
    """keep_last = 2, keep_every = 2: after saves 1..5, steps 2 and 4 (every 2nd) and 5 remain.
    Killed in the middle of deleting an old one (after save 5 moved ``latest``): the latest
    checkpoint loads, no step_* folder is half-deleted, and the next save clears the leftover."""
    assert run_workers(_retention_worker, 1, str(tmp_path), False)[0] == [
        "latest", "step_00000002", "step_00000004", "step_00000005"]
    killed = tmp_path / "killed"
    with pytest.raises(AssertionError, match=r"died \(exit codes \[-9\]\)"):
        run_workers(_retention_worker, 1, str(killed), True)
    entries = sorted(os.listdir(killed / "kept"))
    assert entries == [".deleting_step_00000003", "latest", "step_00000002", "step_00000004", "step_00000005"]
    step, after = run_workers(_retention_after_kill_worker, 1, str(killed))[0]
    assert step == 5 and after == ["latest", "step_00000002", "step_00000004", "step_00000005", "step_00000006"]


def test_device_settings_of_the_gpu_path():
    """What a GPU run's TransformerConfig gets, decided here without one: on-device init, and
    the fused kernels only with TransformerEngine; CPU: host init (identical weights at any TP
    size), no fusions, no p2p sync."""
    from tropd_megatron.megatron.models import device_settings, transformer_config

    assert device_settings(on_gpu=True, have_te=True) == dict(
        use_cpu_initialization=False, batch_p2p_sync=True, apply_rope_fusion=True, bias_activation_fusion=True,
        gradient_accumulation_fusion=True)
    no_te = device_settings(on_gpu=True, have_te=False)
    assert not any(no_te[k] for k in ("use_cpu_initialization", "apply_rope_fusion", "bias_activation_fusion",
                                      "gradient_accumulation_fusion"))
    assert device_settings(on_gpu=False, have_te=False) == dict(
        use_cpu_initialization=True, batch_p2p_sync=False, apply_rope_fusion=False, bias_activation_fusion=False,
        gradient_accumulation_fusion=False)
    config = transformer_config(STUDENT, ParallelConfig(1, 1))  # this machine: the CPU settings
    assert config.use_cpu_initialization and not config.apply_rope_fusion and not config.batch_p2p_sync


def _norm_counted_worker(rank, world, tensor):
    """Parameters this rank's gradient norm counts, by Megatron's own rule (not shared, not a
    tensor-parallel duplicate), as {name: elements}, after the student is built and loaded."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    parallel = ParallelConfig(tensor, 1)
    initialize(parallel, seed=0)
    student = build_student(STUDENT, parallel, OptimConfig(), 4)
    return {name: p.numel() for name, p in student.model.module.named_parameters()
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)}


def test_the_gradient_norm_counts_every_weight_once_at_tp2():
    """Summed over the TP ranks, the norm's parameters hold exactly the TP=1 model's elements:
    a tensor-parallel shard not marked as one counts on rank 0 only (Megatron's local layers
    mark weights only while initialising them, so a build without initialisation for a model
    loaded next gave a resumed run's grad norm 0.85x the uninterrupted one's)."""
    whole = run_workers(_norm_counted_worker, 1, 1)[0]
    ranks = run_workers(_norm_counted_worker, 2, 2)
    assert set(ranks[0]) == set(whole)
    assert sum(sum(r.values()) for r in ranks) == sum(whole.values())
    split = {name for name in whole if ranks[0][name] < whole[name]}
    assert any("linear_qkv" in n for n in split) and any("linear_fc2" in n for n in split)  # column and row


def _layers_worker(rank, world, path):
    initialize(ParallelConfig(1, 1), seed=0)
    model = build_gpt(STUDENT, ParallelConfig(1, 1))
    try:
        load_checkpoint(path, model)
    except ValueError as e:
        return str(e)
    return "loaded"


def test_a_checkpoint_of_the_other_layer_kind_is_refused_by_name(initial, tmp_path):
    """Checkpoints record which layers wrote them (TE's and the local spec's parameter names
    differ); loading one into the other kind says so and the way out (through Hugging Face)."""
    import json
    import shutil

    from tropd_megatron.megatron.checkpoint import METADATA

    source = os.path.join(initial, "student", "step_00000000")
    assert json.load(open(os.path.join(source, METADATA)))["layers"] == "local"  # this CPU machine
    copy = tmp_path / "step_00000000"
    shutil.copytree(source, copy)
    meta = json.load(open(copy / METADATA))
    (copy / METADATA).write_text(json.dumps({**meta, "layers": "transformer_engine"}))
    message = run_workers(_layers_worker, 1, str(copy))[0]
    assert "was written with transformer_engine layers and this run builds local ones" in message
    assert "launch.export" in message
    del meta["layers"]  # a checkpoint from before the record loads as before
    (copy / METADATA).write_text(json.dumps(meta))
    assert run_workers(_layers_worker, 1, str(copy))[0] == "loaded"
    from tropd_megatron.megatron.checkpoint import LEGACY_METADATA, checkpoint_metadata, latest_checkpoint

    (copy / METADATA).rename(copy / LEGACY_METADATA)  # the file's name before 2026-12-03
    (tmp_path / "latest").write_text(copy.name)
    assert latest_checkpoint(tmp_path) == copy and checkpoint_metadata(copy) == meta
    assert run_workers(_layers_worker, 1, str(copy))[0] == "loaded"
    (copy / LEGACY_METADATA).unlink()  # neither name: incomplete
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        latest_checkpoint(tmp_path)

"""Faults during training lose nothing: a job killed with SIGKILL (every process at once, as
when a node dies), between checkpoints or in the middle of writing one, and launched again
resumes from its last complete checkpoint and reaches bitwise the same per-step metrics and
final evaluation as a run that was never interrupted. A teacher whose logits overflow has its
tokens masked, the updates skipped and counted, and the run stopped with the reason; a
checkpoint holding NaN weights is refused naming the file and tensor. Workers exit when
torchrun alone is killed."""
import json
import os
import subprocess
import sys
import time

import pytest

from support.distributed import free_port
from support.hf_models import hf_model, model_overrides
from support.runs import single_process
from support.tiny_files import make_tiny_files
from tropd_megatron.logs import read_metrics
from support import REPO

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")
ROOT = REPO
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMING = ("seconds", "tokens_per_second")


def launch(overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "launch.train", "--recipe", "tiny", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_all(proc):
    """SIGKILL torchrun and its workers at once (the workers run in sessions of their own)."""
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=30)


def recorded_steps(folder) -> list:
    """The steps of every record in a run's metrics.jsonl, in the order written (a resumed
    run appends the steps it trains)."""
    return [json.loads(line)["step"] for line in open(os.path.join(folder, "metrics.jsonl"))]


def final_metrics(folder):
    """Each step's kept record, without wall-clock timings."""
    return {step: {k: v for k, v in record.items() if k not in TIMING} for step, record in read_metrics(folder).items()}


def kill_during_save(proc, folder, step: int) -> None:
    """SIGKILL the job while it writes the step's checkpoint (its ``.incomplete_`` folder exists)."""
    for line in proc.stdout:
        if line.startswith(f"step {step}/"):  # the step's progress line comes just before its save
            break
    partial = folder / f".incomplete_step_{step:08d}"
    deadline = time.monotonic() + 60
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    kill_all(proc)
    assert partial.exists(), "the save was not caught in progress"


@pytest.mark.timeout(600)
def test_sigkill_then_relaunch_matches_an_uninterrupted_run_bitwise(tmp_path):
    overrides = make_tiny_files(tmp_path) + ["schedule.steps=6", "checkpoint.save_every=2", "eval.every=0"]
    whole = launch([*overrides, f"checkpoint.dir={tmp_path}/whole"])
    out, _ = whole.communicate(timeout=200)
    assert whole.returncode == 0, out[-3000:]

    killed = launch([*overrides, f"checkpoint.dir={tmp_path}/killed"])
    for line in killed.stdout:
        if line.startswith("step 3/6"):  # after the step-2 checkpoint, before the step-4 one
            kill_all(killed)
            break
    killed.wait(timeout=30)
    assert (tmp_path / "killed" / "latest").read_text() == "step_00000002"
    again = launch([*overrides, f"checkpoint.dir={tmp_path}/killed"])
    out, _ = again.communicate(timeout=200)
    assert again.returncode == 0, out[-3000:]
    assert recorded_steps(tmp_path / "killed")[-4:] == [3, 4, 5, 6]  # resumed after step 2, not from the start
    assert recorded_steps(tmp_path / "killed").count(1) == 1

    # killed while writing the step-4 checkpoint: step 2's is the one that loads
    saving = launch([*overrides, f"checkpoint.dir={tmp_path}/saving"])
    kill_during_save(saving, tmp_path / "saving", 4)
    saving.wait(timeout=30)
    assert (tmp_path / "saving" / "latest").read_text() == "step_00000002"
    again = launch([*overrides, f"checkpoint.dir={tmp_path}/saving"])
    out, _ = again.communicate(timeout=200)
    assert again.returncode == 0, out[-3000:]
    assert recorded_steps(tmp_path / "saving")[-4:] == [3, 4, 5, 6]  # resumed from step 2's checkpoint

    assert sorted(final_metrics(tmp_path / "whole")) == [1, 2, 3, 4, 5, 6]
    for run in ("killed", "saving"):
        assert final_metrics(tmp_path / run) == final_metrics(tmp_path / "whole"), run
        for step in (0, 6):  # evaluation before and after: the same generations, problem by problem
            name = f"eval/step_{step:08d}.jsonl"
            assert (tmp_path / run / name).read_text() == (tmp_path / "whole" / name).read_text(), run


@pytest.mark.timeout(200)
def test_workers_exit_when_torchrun_alone_is_killed(tmp_path):
    """They run in sessions of their own; left running they would write checkpoints beside
    the next launch."""
    import psutil

    job = launch(make_tiny_files(tmp_path) + ["schedule.steps=40", "eval.path=null"])
    for line in job.stdout:
        if line.startswith("step 1/"):
            break
    workers = psutil.Process(job.pid).children(recursive=True)
    assert len(workers) == 2
    psutil.Process(job.pid).kill()
    _, alive = psutil.wait_procs(workers, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, "workers outlived torchrun"
    # the first rank to notice says so; the other may instead fail on its peer's closed connection
    assert f"torchrun (pid {job.pid}) is gone; exiting" in job.stdout.read()


def faulty_teacher(root, fault: str) -> list:
    """A Hugging Face teacher of finite weights whose logits overflow to +-inf (``overflow``), or
    one with a NaN weight (``nan``); the overrides that run the tiny recipe with it."""
    from safetensors.torch import load_file, save_file

    folder = root / "teacher"
    hf_model("llama", folder, rows=64)
    tensors = load_file(folder / "model.safetensors")
    if fault == "overflow":
        tensors["lm_head.weight"] *= 1e30
        tensors["model.norm.weight"].fill_(1e30)
    else:
        tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return [*make_tiny_files(root), *model_overrides("teacher", folder, 40), f"teacher.checkpoint={folder}",
            "eval.path=null", "schedule.steps=6"]


@pytest.mark.timeout(300)
def test_a_teacher_whose_logits_overflow_masks_skips_counts_then_stops(tmp_path):
    overrides = faulty_teacher(tmp_path, "overflow")
    out, _ = single_process([*overrides, "optim.max_skipped_in_a_row=3"]).communicate(timeout=240)
    assert "error: the last 3 updates were all skipped (optim.max_skipped_in_a_row=3; last reason: no loss tokens " \
           "(every token masked)); stopping without a checkpoint, the next launch resumes from the start" in out, out
    assert "tokens with non-finite teacher logits masked | update SKIPPED: no loss tokens" in out
    records = read_metrics(tmp_path / "run")
    assert sorted(records) == [1, 2, 3]
    for step, record in records.items():
        assert record["skipped_update"] and record["skipped_updates"] == step
        assert record["nonfinite_tokens"] == record["response_tokens"] > 0 and record["tokens"] == 0
    assert not list((tmp_path / "run").glob("step_*"))

    # with teacher-written prefixes the teacher samples from those logits: stopped, named
    prefixed = single_process([*overrides, f"checkpoint.dir={tmp_path}/prefixed", "rollout.prefix_share_start=1",
                               "rollout.prefix_share_end=1", "rollout.prefix_tokens_start=4",
                               "rollout.prefix_tokens_end=4"])
    out, _ = prefixed.communicate(timeout=240)
    assert prefixed.returncode == 1
    assert "error: teacher: NaN or +inf logits while generating" in out, out[-3000:]


@pytest.mark.timeout(120)
def test_a_checkpoint_with_a_nan_weight_is_refused_naming_it(tmp_path):
    proc = single_process(faulty_teacher(tmp_path, "nan"))
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == 2, out[-3000:]
    assert f"error: teacher.checkpoint={tmp_path}/teacher: {tmp_path}/teacher holds non-finite values " \
           "(in decoder.layers.1.mlp.linear_fc2.weight)" in out, out[-3000:]

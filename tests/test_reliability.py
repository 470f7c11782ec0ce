"""Faults during training lose nothing: a job killed with SIGKILL (every process at once, as
when a node dies), between checkpoints or in the middle of writing one, and launched again
resumes from its last complete checkpoint and reaches bitwise the same per-step metrics and
final evaluation as a run that was never interrupted."""
import os
import subprocess
import sys
import time

import pytest

from distributed import free_port
from tiny_files import make_tiny_files
from tropd_megatron.train import read_metrics

pytest.importorskip("megatron.core")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    assert "at step 2" in out and "step 1/6" not in out

    # killed while writing the step-4 checkpoint: step 2's is the one that loads
    saving = launch([*overrides, f"checkpoint.dir={tmp_path}/saving"])
    kill_during_save(saving, tmp_path / "saving", 4)
    saving.wait(timeout=30)
    assert (tmp_path / "saving" / "latest").read_text() == "step_00000002"
    again = launch([*overrides, f"checkpoint.dir={tmp_path}/saving"])
    out, _ = again.communicate(timeout=200)
    assert again.returncode == 0, out[-3000:]
    assert "at step 2" in out

    assert sorted(final_metrics(tmp_path / "whole")) == [1, 2, 3, 4, 5, 6]
    for run in ("killed", "saving"):
        assert final_metrics(tmp_path / run) == final_metrics(tmp_path / "whole"), run
        for step in (0, 6):  # evaluation before and after: the same generations, problem by problem
            name = f"eval/step_{step:08d}.jsonl"
            assert (tmp_path / run / name).read_text() == (tmp_path / "whole" / name).read_text(), run

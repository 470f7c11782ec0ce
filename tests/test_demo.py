"""A shortened `make demo` (tiny budgets) under torchrun: every phase runs and leaves its
outputs; a second run reuses the cached teacher and student."""
import json
import os
import subprocess
import sys

import pytest

from distributed import free_port

pytest.importorskip("megatron.core")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "tropd_megatron.demo", "--out", str(out), "--teacher-sft-steps", "10", "--student-sft-steps", "5",
           "--tropd-steps", "2", "--eval-every", "1", "--eval-problems", "20", "--train-problems", "300"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(600)
def test_shortened_demo_runs_every_phase(tmp_path):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "trust_fraction"}
    assert summary["tropd_steps"] == 2 and 0 < summary["trust_fraction"] <= 1
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    assert "| student after 2 TrOPD steps |" in first.stdout
    assert "SFT teacher" in first.stderr and "TrOPD" in first.stderr  # progress bars
    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teacher: loaded from" in second.stderr and "student_init: loaded from" in second.stderr

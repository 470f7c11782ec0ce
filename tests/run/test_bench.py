"""The loss benchmark runs end to end under torchrun at a tiny size (it is timed in
bench/, never here): every row reports, and the compact objectives issue one collective."""
import os
import subprocess
import sys

import pytest
from support import REPO

ROOT = REPO


@pytest.mark.timeout(180)
def test_benchmark_runs_under_torchrun(tmp_path):
    from support.distributed import free_port

    table = tmp_path / "table.md"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           os.path.join(ROOT, "bench", "losses.py"), "--tokens", "64", "--vocab", "512", "--iters", "1",
           "--markdown", str(table)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names[0] == "Megatron vocab_parallel_cross_entropy" and len(rows) == 10, names
    for row in rows[2:-1]:  # every compact objective: one all-gather per call
        assert row.split(" | ")[5] == "1", row


@pytest.mark.timeout(180)
def test_rollout_benchmark_runs_and_checks_both_engines_agree(tmp_path):
    """bench/rollout.py at a tiny size: both engines generate (the script asserts they agree
    token for token) and the dynamic engine needs fewer forward passes on the long tail."""
    from support.distributed import free_port

    table = tmp_path / "rollout.md"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           os.path.join(ROOT, "bench", "rollout.py"), "--requests", "12", "--median", "6", "--concurrency", "4",
           "--layers", "2", "--hidden", "64", "--repeats", "1", "--markdown", str(table)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.read_text().splitlines()
            if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"engine", "static", "dynamic", "dynamic / static"}
    assert int(rows["dynamic"][3]) < int(rows["static"][3])  # forward passes


@pytest.mark.timeout(180)
def test_step_benchmark_runs_and_packing_computes_fewer_tokens(tmp_path):
    """bench/step.py at a tiny size: both layouts step (the script asserts the same loss) and
    the packed one computes fewer tokens."""
    from support.distributed import free_port

    table = tmp_path / "step.md"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           os.path.join(ROOT, "bench", "step.py"), "--rollouts", "12", "--median", "6", "--prompt-tokens", "8",
           "--layers", "1", "--hidden", "32", "--vocab", "128", "--repeats", "1", "--markdown", str(table)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.read_text().splitlines()
            if line.startswith("| ") and "---" not in line}
    assert int(rows["packed"][2]) < int(rows["padded"][2])  # tokens computed (targets: docs/benchmarks.md)


@pytest.mark.timeout(300)
def test_layout_benchmark_runs_both_layouts(tmp_path):
    """bench/layouts.py at 2 processes and a tiny size: a full iteration with the student on the
    teacher's layout and on its own, every phase timed, the ratio printed."""
    table = tmp_path / "layouts.md"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "layouts.py"), "--world", "2", "--prompts", "2",
           "--max-new-tokens", "4", "--prefix-tokens", "2", "--teacher-layers", "1", "--teacher-hidden", "32",
           "--student-layers", "1", "--student-hidden", "32", "--repeats", "1", "--markdown", str(table)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.rstrip(" |").split(" | ") for line in table.read_text().splitlines() if line.startswith("| TP")]
    assert [r[0] for r in rows] == ["| TP 2 x DP 1 (student on the teacher's layout)",
                                    "| TP 1 x DP 2 (student on its own layout)"]
    assert all(float(r[1]) > 0 and float(r[5]) > 0 and float(r[6]) > 0 for r in rows)  # rollout, step, tokens/s
    assert "step time, TP 2 / TP 1 x DP 2:" in table.read_text()

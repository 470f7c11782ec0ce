"""A shortened `make compare`: two objectives x two seeds on tiny budgets give a table with
one column per seed and a mean ± sd, a plot and every curve; a second call reuses the
finished runs instead of training them again."""
import json
import os
import subprocess
import sys

import pytest

from distributed import free_port

pytest.importorskip("megatron.core")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_compare(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "launch.compare", "--root", str(tmp_path / "demo"), "--out", str(tmp_path / "compare"),
           "--seeds", "0,1", "--variants", "OPD,TrOPD fkl", "task.teacher_sft_steps=4",
           "task.student_sft_steps=2", "task.train_problems=300", "task.eval_problems=8", "schedule.steps=2",
           "eval.every=1", "rollout.sampling.max_new_tokens=12", "eval.max_new_tokens=12"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(600)
def test_shortened_compare_writes_table_plot_and_curves(tmp_path):
    first = run_compare(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (tmp_path / "compare.md").read_text()
    assert "| objective | before | after, seed 0 | after, seed 1 | after, mean ± sd |" in table
    rows = [line for line in table.splitlines() if line.startswith("| OPD") or line.startswith("| TrOPD fkl")]
    assert len(rows) == 2 and all(" ± " in row for row in rows)
    results = json.loads((tmp_path / "compare.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in results) == [("OPD", 0), ("OPD", 1), ("TrOPD fkl", 0),
                                                                   ("TrOPD fkl", 1)]
    assert all([s for s, _ in r["curve"]] == [0, 1, 2] and r["problems"] == 8 for r in results)
    assert (tmp_path / "compare.png").stat().st_size > 1000
    second = run_compare(tmp_path)  # finished runs are resumed at their last step: nothing retrained
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("at step 2") == 4 and "step 1/2" not in second.stderr
    assert json.loads((tmp_path / "compare.json").read_text()) == results

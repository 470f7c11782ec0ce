"""A shortened `make compare`: two objectives, a two-rate sweep, two seeds at the chosen rate,
on tiny budgets: the tables (sweep with the choice marked, test mean ± sd with a 95% interval,
response length and stopped fraction, the ablation chain), the curves and every record; a
second call trains nothing again."""
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
           "--lrs", "1e-3,3e-3", "--seeds", "0,1", "--variants", "OPD,TrOPD mask", "task.teacher_sft_steps=4",
           "task.student_sft_steps=2", "task.train_problems=300", "task.eval_problems=8",
           "task.validation_problems=6", "schedule.steps=3", "eval.every=1", "rollout.sampling.max_new_tokens=12",
           "eval.max_new_tokens=12"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(900)
def test_shortened_compare_follows_the_protocol_and_resumes(tmp_path):
    first = run_compare(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads((tmp_path / "compare.json").read_text())
    runs = data["runs"]
    # the sweep (2 rates x seed 0) and the second seed at each objective's chosen rate
    assert sorted((r["variant"], r["seed"]) for r in runs.values()) == [("OPD", 0), ("OPD", 0), ("OPD", 1),
                                                                       ("TrOPD mask", 0), ("TrOPD mask", 0),
                                                                       ("TrOPD mask", 1)]
    from launch.compare import chosen_lr, selection_score

    for variant in ("OPD", "TrOPD mask"):
        sweep = {r["lr"]: r for r in runs.values() if r["variant"] == variant and r["seed"] == 0}
        best = chosen_lr(runs, variant, (1e-3, 3e-3))
        assert selection_score(sweep[best]) == max(selection_score(r) for r in sweep.values())
        assert [r["lr"] for r in runs.values() if r["variant"] == variant and r["seed"] == 1] == [best]
    for r in runs.values():
        assert [s for s, _ in r["validation"]] == [0, 1, 2, 3] and r["validation_problems"] == 6
        assert r["test_problems"] == 8 and 0 <= r["test"] <= 1 and r["response_length"] > 0
    assert data["protocol"]["validation_problems"] == 6 and data["protocol"]["test_problems"] == 8
    table = (tmp_path / "compare.md").read_text()
    assert "| objective | lr 0.001 | lr 0.003 |" in table and table.count(" * |") == 2  # one choice a row
    rows = [line for line in table.splitlines() if line.startswith(("| OPD | 0", "| TrOPD mask | 0")) and "±" in line]
    assert len(rows) == 2 and all("[" in row for row in rows)  # mean ± sd and the 95% interval
    assert "| + trust-region mask | TrOPD mask |" in table and "47.72" in table
    assert "Chosen at an end of the sweep, so a rate beyond it was not tried: OPD (" in table  # 2 rates: both ends
    assert "- Highest mean: " in table and "Intervals entirely above OPD's:" in table and "Compute: 6 runs" in table
    assert (tmp_path / "compare.png").stat().st_size > 1000
    second = run_compare(tmp_path)  # every run is on record: none is trained or even resumed
    assert second.returncode == 0, second.stderr[-3000:]
    assert "== " not in second.stderr and json.loads((tmp_path / "compare.json").read_text()) == data

"""A shortened `make demo` (tiny budgets) under torchrun: every phase runs and leaves its
outputs; a second run reuses the cached teacher and student and the finished TrOPD run."""
import json
import os
import subprocess
import sys

import pytest

from support.distributed import free_port
from support import REPO

pytest.importorskip("megatron.core")
ROOT = REPO


def run_demo(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "launch.demo", "--root", str(out), "task.teacher_sft_steps=10", "task.student_sft_steps=5",
           "task.train_problems=300", "task.eval_problems=20", "schedule.steps=2", "eval.every=1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(600)
def test_shortened_demo_runs_every_phase(tmp_path):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "trust_fraction"}
    assert summary["steps"] == 2 and summary["eval_problems"] == 20 and 0 < summary["trust_fraction"] <= 1
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    assert "| student after 2 tropd steps |" in first.stdout
    evals = []  # each evaluation's avg@1 from its per-problem results
    for step in (0, 1, 2):
        rows = [json.loads(line) for line in (tmp_path / "tropd" / "eval" / f"step_{step:08d}.jsonl").read_text().splitlines()]
        evals.append(sum(r["score"] for r in rows) / len(rows))
    assert summary["last_eval_steps"] == [0, 1, 2]  # LAST_EVALS of them: every evaluation of this short run
    assert summary["student_accuracy_after"] == pytest.approx(evals[-1])
    assert summary["student_accuracy_last_mean"] == pytest.approx(sum(evals) / 3)
    assert "expected band: not compared" in first.stdout  # a shortened demo is not the default one
    assert sorted(os.listdir(tmp_path / "tropd" / "eval")) == [f"step_{s:08d}.jsonl" for s in (0, 1, 2)]
    made = {name: os.stat(tmp_path / name / "latest").st_mtime_ns for name in ("teacher", "student_init", "tropd")}
    records = (tmp_path / "tropd" / "metrics.jsonl").read_text()
    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    # the cached models and the finished run are reused: nothing retrained, no step recorded again
    assert {name: os.stat(tmp_path / name / "latest").st_mtime_ns for name in made} == made
    assert (tmp_path / "tropd" / "metrics.jsonl").read_text() == records
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_the_band_check_says_inside_outside_or_not_compared():
    from launch.demo import EXPECTED, band_lines

    inside = {key: (low + high) / 2 for key, (low, high) in EXPECTED.items()}
    assert all(" is inside " in line for line in band_lines(inside, overridden=False))
    low = dict(inside, student_accuracy_last_mean=EXPECTED["student_accuracy_last_mean"][0] - 0.01)
    assert [" is OUTSIDE " in line for line in band_lines(low, overridden=False)] == [False, True]
    assert band_lines(low, overridden=True) == [band_lines(inside, overridden=True)[0]]
    assert "not compared" in band_lines(low, overridden=True)[0]


def test_demo_refuses_an_unknown_task_setting(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.demo", "task.nope=1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "nope" in out.stderr

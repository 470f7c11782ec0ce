"""`make gpu-check`'s harness on CPU: --dry-run reports the machine and every GPU-only step as
skipped with the reason; without a GPU and without --dry-run it exits 1 saying so."""
import subprocess
import sys

import pytest
import torch
from support import REPO

ROOT = REPO


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU modes of the harness")
def test_dry_run_reports_the_machine_and_skips_the_gpu_steps(tmp_path):
    report = tmp_path / "gpu-check.md"
    for args, code, reason in ((["--dry-run"], 0, "--dry-run"), ([], 1, "no CUDA GPU")):
        out = subprocess.run([sys.executable, "-m", "launch.gpu_check", "--out", str(report), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=100)
        assert out.returncode == code, out.stderr[-2000:]
        text = report.read_text()
        assert "## 1. The machine" in text and "- device: no CUDA GPU" in text
        assert "- pinned stack (gpu-requirements.txt): no CUDA GPU" in text and "megatron-core 0.16.1" in text
        sections = [line for line in text.splitlines() if line.startswith("## ")]
        assert len(sections) == 5, sections  # the machine + four GPU-only steps
        assert text.count(f"skipped: {reason} (needs a CUDA GPU)") == 4


def test_a_step_reports_ok_failure_and_timeout_and_the_training_table(tmp_path):
    import json

    from launch.gpu_check import Step, run_step, training_summary

    assert run_step(Step("ok", [sys.executable, "-c", "print('hi')"], 30), str(tmp_path))[0] == "ok"
    status, _, tail = run_step(Step("bad", [sys.executable, "-c", "raise SystemExit('broken')"], 30), str(tmp_path))
    assert status == "failed (exit 1)" and "broken" in tail
    assert run_step(Step("slow", [sys.executable, "-c", "import time; time.sleep(5)"], 1), str(tmp_path))[0] == \
        "timed out after 1 s"
    (tmp_path / "run").mkdir()
    record = {"step": 1, "tokens_per_second": 1234.0, "rollout_log_ratio_abs": 0.0123, "rollout_clip_fraction": 0.25,
              "rollout_log_ratio_p99": 0.1, "kv_bytes": 3 * 2**20, "memory_peak_gib": 1.5,
              "seconds": {"rollout": 1.5, "teacher": 0.25, "student": 0.5, "optimizer": 0.125, "total": 2.375}}
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert training_summary(str(tmp_path))[-1] == \
        "| 1 | 1.50 | 0.25 | 0.50 | 0.12 | 1.23e-02 | 1.00e-01 | 0.250 | 3.0 | 1.50 | 1234 |"
    planned = training_summary(str(tmp_path), ["parallel.tensor=1", "rollout.engine.kv_cache_gib=0.001"])[-1]
    assert planned.startswith("planner, per GPU: rollouts ") and planned.endswith("KV caches 1.0 MiB")

"""`slurm/tropd_70b.sh` on a real one-node Slurm cluster (slurmctld + slurmd started here, see
slurm_cluster.py), CPU ranks: the tiny recipe runs 2 steps at TP=2 as 2 Slurm tasks and leaves
its checkpoint; a SIGUSR1 to the batch shell (what `--signal=B:USR1@...` sends before the time
limit) makes the ranks checkpoint and exit 75, the script requeues the job, and the requeued
job resumes from that checkpoint and finishes; a failing run fails the job with its exit code.
Skipped where Slurm can't be had (not root, no apt). ~3 minutes (+ ~20 s when apt installs Slurm).
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from support.slurm_cluster import ClusterUnavailable, start_cluster
from support.tiny_files import make_tiny_files
from support import REPO

pytest.importorskip("megatron.core")
ROOT = REPO
SCRIPT = os.path.join(ROOT, "slurm", "tropd_70b.sh")
# command-line options override the script's #SBATCH lines; --time above its 15-minute --signal lead
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=30", "--export=ALL"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = time.time()
    try:
        c = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as e:
        pytest.skip(f"no Slurm cluster here: {e}")
    print(f"\nslurm: packages {c.install_seconds:.0f} s, cluster up in {c.start_seconds:.1f} s "
          f"(total {time.time() - started:.1f} s)")
    yield c
    c.stop()


def job_env(cluster, overrides, recipe="tiny"):
    return {**cluster.env, "TROPD_GPUS_PER_NODE": "0", "TROPD_NPROC_PER_NODE": "2", "TROPD_RECIPE": recipe,
            "TROPD_REPO": ROOT, "TROPD_PYTHON": sys.executable, "TROPD_OVERRIDES": " ".join(overrides),
            "OMP_NUM_THREADS": "1"}


def read(path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def failure(cluster, log) -> str:
    return f"--- job log:\n{read(log)[-4000:]}\n--- cluster:\n{cluster.diagnostics()}"


@pytest.mark.timeout(600)  # includes the module's cluster start (and apt-get install when Slurm is missing)
def test_two_steps_finish_with_a_checkpoint(cluster, tmp_path):
    """With a recipe of the user's own (a file beside the job, TROPD_RECIPE=path:function)."""
    overrides = make_tiny_files(tmp_path) + ["schedule.steps=2"]
    (tmp_path / "my_recipes.py").write_text("from recipes.tiny import tiny\n\n\ndef my_tiny():\n    return tiny()\n")
    log = tmp_path / "job.out"
    started = time.time()
    out = cluster.run(["sbatch", "--wait", *CPU_JOB, f"--output={log}", SCRIPT], check=False, timeout=400,
                      env=job_env(cluster, overrides, f"{tmp_path}/my_recipes.py:my_tiny"), cwd=tmp_path)
    print(f"sbatch --wait: {time.time() - started:.1f} s")
    text = read(log)
    assert out.returncode == 0, f"sbatch exited {out.returncode}: {out.stderr}\n" + failure(cluster, log)
    assert "2 ranks (2/node, 0 GPUs/node)" in text and f"recipe {tmp_path}/my_recipes.py:my_tiny" in text, text[-3000:]
    assert f"checkpoints: {tmp_path}/run" in text and f"tensorboard: {tmp_path}/tensorboard" in text
    assert "training finished" in text, text[-3000:]
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "run" / "latest").read_text() == "step_00000002"


@pytest.mark.timeout(300)
def test_a_failing_run_fails_the_job_with_its_exit_code(cluster, tmp_path):
    log = tmp_path / "job.out"
    out = cluster.run(["sbatch", "--wait", *CPU_JOB, f"--output={log}", SCRIPT], check=False, timeout=240,
                      env=job_env(cluster, make_tiny_files(tmp_path) + ["schedule.stepz=2"]), cwd=tmp_path)
    text = read(log)
    assert out.returncode == 2, f"sbatch exited {out.returncode}\n" + failure(cluster, log)
    assert "unknown override key 'schedule.stepz'" in text and "training failed with exit code 2" in text, text[-3000:]
    assert "requeue" not in text


@pytest.mark.timeout(600)
def test_usr1_to_the_batch_shell_checkpoints_requeues_and_resumes(cluster, tmp_path):
    steps = 40
    overrides = make_tiny_files(tmp_path) + [f"schedule.steps={steps}", "checkpoint.save_every=1000",
                                             "eval.path=null"]
    log = tmp_path / "job.out"
    sbatch = subprocess.Popen(["sbatch", "--wait", *CPU_JOB, f"--output={log}", SCRIPT], cwd=tmp_path,
                              env=job_env(cluster, overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        job = re.match(r"Submitted batch job (\d+)", sbatch.stdout.readline()).group(1)

        def wait_for(pattern, seconds, what):
            deadline = time.time() + seconds
            while time.time() < deadline:
                if re.search(pattern, read(log), re.M):
                    return
                assert sbatch.poll() is None, f"sbatch exited {sbatch.returncode} before {what}\n" + \
                    failure(cluster, log)
                time.sleep(0.2)
            pytest.fail(f"no {what} after {seconds} s\n" + failure(cluster, log))

        wait_for(r"^step 2/40 ", 240, "step 2")
        # what --signal=B:USR1@900 does before the time limit
        cluster.run(["scancel", "--batch", "--signal=USR1", job])
        wait_for(r"requeueing job \d+", 120, "requeue")
        # the requeued job starts again once its credential expires (cred_expire=10 on this cluster)
        rc = sbatch.wait(timeout=300)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    text = read(log)
    assert rc == 0, f"sbatch exited {rc}\n" + failure(cluster, log)
    first, _, second = text.partition("restart 1")
    saved = re.search(r"SIGUSR1: checkpoint at step (\d+) written; exiting with 75", first)
    assert saved and "batch shell got SIGUSR1" in first and f"requeueing job {job}" in first, text[-4000:]
    step = int(saved.group(1))
    assert 2 <= step < steps
    assert f"resumed from {tmp_path}/run/step_{step:08d} at step {step}" in second, second[-3000:]
    assert f"step {step + 1}/{steps} " in second and "step 1/40 " not in second
    assert f"step {steps}/{steps} " in second and "training finished" in second
    assert (tmp_path / "run" / "latest").read_text() == f"step_{steps:08d}"

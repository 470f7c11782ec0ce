"""launch.nemo: the NeMo-Run launcher, run as a subprocess with NeMo-Run's folders under tmp_path.

Local runs start torchrun with 2 processes (about a minute each on a busy 2-core machine); the Slurm
test is a dry run (no Slurm installation needed)."""
import os
import subprocess
import sys

import pytest

from tiny_files import make_tiny_files

pytest.importorskip("nemo_run")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_nemo(tmp_path, *argv, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", NEMORUN_HOME=str(tmp_path / "nemo_run"))
    return subprocess.run([sys.executable, "-m", "launch.nemo", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def local_tiny(tmp_path, *extra):
    overrides = make_tiny_files(tmp_path / "task")
    return launch_nemo(tmp_path, "--recipe", "tiny", "--executor", "local", "--nproc-per-node", "2", *overrides,
                       "schedule.steps=2", *extra, timeout=420)


@pytest.mark.timeout(480)
def test_local_executor_runs_tiny_recipe(tmp_path):
    result = local_tiny(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "task" / "run" / "latest").read_text() == "step_00000002"
    assert "succeeded" in result.stdout


@pytest.mark.timeout(480)
def test_failed_job_is_reported(tmp_path):
    # passes validation (any path is a valid string), fails inside the job
    result = local_tiny(tmp_path, "tokenizer=/nonexistent/tok.model")
    assert result.returncode != 0, result.stdout[-3000:]
    assert "ended FAILED" in result.stderr
    assert str(tmp_path / "nemo_run") in result.stderr  # where its logs are


@pytest.mark.timeout(180)
def test_slurm_dryrun_writes_sbatch_script(tmp_path):
    result = launch_nemo(tmp_path, "--recipe", "llama3_70b_to_8b", "--executor", "slurm", "--nodes", "2",
                         "--account", "acct", "--partition", "batch", "--dryrun", "schedule.steps=50",
                         "optim.lr=1e-6", timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("sbatch script: ")][0]
    assert path.startswith(str(tmp_path))
    script = open(path).read()
    for expected in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --account=acct", "#SBATCH --partition=batch", "torchrun", "--nnodes 2",
                     "--nproc-per-node 8", "-m launch.train", "--recipe llama3_70b_to_8b", "schedule.steps=50",
                     "optim.lr=1e-6"):
        assert expected in script, f"{expected!r} not in\n{script}"


@pytest.mark.timeout(120)
def test_bad_override_key_exits_2_before_launching(tmp_path):
    result = launch_nemo(tmp_path, "--recipe", "tiny", "--executor", "local", "schedule.stepz=2", timeout=100)
    assert result.returncode == 2
    assert "schedule.stepz" in result.stderr
    assert not (tmp_path / "nemo_run").exists()  # no experiment was created

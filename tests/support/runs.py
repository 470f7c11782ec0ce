"""Launching the project's entry points from tests."""
import os
import subprocess
import sys

from support import REPO
from support.distributed import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def single_process(args):
    """One rank (parallel.tensor=1) without torchrun: its exit code is the trainer's own."""
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    return subprocess.Popen([sys.executable, "-m", "launch.train", "--recipe", "tiny", "parallel.tensor=1", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

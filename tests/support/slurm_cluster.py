"""A throwaway single-node Slurm cluster for tests: Debian's slurmctld + slurmd as plain
background processes (no systemd, no munge, no cgroups), configuration, state and logs under
a temporary folder.

    with slurm_cluster(tmp_path) as cluster:
        out = cluster.run(["sbatch", "--wait", "job.sh"])

Clients find the cluster through ``SLURM_CONF`` (``cluster.env`` has it; jobs submitted with
``--export=ALL`` inherit it). Needs root: the packages are apt-installed when missing, and the
daemons run as root. ``ClusterUnavailable`` says why a cluster cannot be had here (tests skip
on it); ``ClusterError`` is a cluster that was expected to start and did not (tests fail on it,
with the daemons' log tails in the message).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
PARTITION = "tropd"


class ClusterUnavailable(Exception):
    """No Slurm here and no way to install it (not root, no apt, install failed)."""


class ClusterError(RuntimeError):
    """The daemons did not come up (or a command failed); the message holds their log tails."""


def _which_all() -> bool:
    return all(shutil.which(b) for b in BINARIES)


def ensure_packages(timeout: float = 600) -> float:
    """Install the Debian packages when a binary is missing; seconds it took (0 when installed)."""
    if _which_all():
        return 0.0
    if os.geteuid() != 0:
        raise ClusterUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("Slurm is not installed and apt-get is unavailable")
    started = time.time()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"{' '.join(cmd)} took over {timeout:.0f} s") from None
        log.append(out.stdout + out.stderr)
        if out.returncode != 0 and cmd[1] == "install":
            raise ClusterUnavailable(f"{' '.join(cmd)} failed ({out.returncode}):\n" + "".join(log)[-2000:])
    if not _which_all():
        raise ClusterUnavailable(f"installed {' '.join(PACKAGES)} but some of {', '.join(BINARIES)} are missing")
    return time.time() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024 * 9 // 10  # leave slurmd's check some slack
    raise ClusterError("no MemTotal in /proc/meminfo")


def _die_with_parent() -> None:
    """In the daemon before exec: SIGTERM when the process that started it dies (a test killed
    by a timeout never reaches ``stop()``; its daemons must not outlive it)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


@dataclass
class SlurmCluster:
    root: Path
    cpus: int
    memory_mb: int
    ctld_port: int = field(default_factory=free_port)
    slurmd_port: int = field(default_factory=free_port)
    procs: dict = field(default_factory=dict)
    install_seconds: float = 0.0
    start_seconds: float = 0.0

    @property
    def node(self) -> str:
        """The node's name, which jobs resolve (MASTER_ADDR): this host's short name, or localhost."""
        host = socket.gethostname().split(".")[0]
        try:
            socket.gethostbyname(host)
            return host
        except OSError:
            return "localhost"

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for d in ("etc", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host, r = self.node, self.root
        self.conf.write_text(f"""\
ClusterName=tropdtest
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# a requeued job may start again once its old credential expires (default 120 s: tests would wait)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/state/slurmctld.pid
SlurmdPidFile={r}/spool/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
MinJobAge=4
KillWait=10
InactiveLimit=0
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        # read by slurmd only when a cgroup plugin is configured (none is): kept for completeness
        (self.root / "etc" / "cgroup.conf").write_text("CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n")

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}{out.stderr}\n"
                               + self.diagnostics())
        return out

    def diagnostics(self) -> str:
        parts = []
        for name, proc in self.procs.items():
            parts.append(f"--- {name}: " + ("running" if proc.poll() is None else f"exited {proc.returncode}"))
            parts.append(_tail(self.root / "log" / f"{name}.log"))
            parts.append(_tail(self.root / "log" / f"{name}.stdout", 10))
        return "\n".join(parts)

    def node_state(self) -> str:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else f"(sinfo: {out.stderr.strip()})"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        out.close()

    def start(self, timeout: float = 60) -> None:
        started = time.time()
        self.write_config()
        # -D: foreground (we hold the process); -i: ignore saved state; -f: this configuration
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        state = ""
        while time.time() - started < timeout:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited {proc.returncode} while starting\n" + self.diagnostics())
            state = self.node_state()
            if state == "idle":
                self.start_seconds = time.time() - started
                return
            time.sleep(0.5)
        raise ClusterError(f"node not idle after {timeout:.0f} s (state {state!r})\n" + self.diagnostics())

    def stop(self, timeout: float = 20) -> None:
        """Cancel this cluster's jobs, then stop both daemons (SIGTERM, then SIGKILL)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--partition", PARTITION], check=False, timeout=10)
            deadline = time.time() + timeout
            while time.time() < deadline:
                q = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)


def start_cluster(root, timeout: float = 60) -> SlurmCluster:
    """Install Slurm when missing (root + apt), then start a one-node cluster under ``root``."""
    install_seconds = ensure_packages()
    cluster = SlurmCluster(Path(root), cpus=os.cpu_count() or 1, memory_mb=real_memory_mb(),
                           install_seconds=install_seconds)
    try:
        cluster.start(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def slurm_cluster(root, timeout: float = 60):
    cluster = start_cluster(root, timeout)
    try:
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":  # python tests/support/slurm_cluster.py [DIR]: start one, print its SLURM_CONF, Ctrl-C stops it
    import signal
    import sys
    import tempfile

    signal.signal(signal.SIGTERM, signal.default_int_handler)

    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slurm-")
    with slurm_cluster(root) as c:
        print(f"up in {c.start_seconds:.1f} s (install {c.install_seconds:.0f} s): export SLURM_CONF={c.conf}",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass

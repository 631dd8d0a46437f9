"""A real two-node Slurm cluster on this machine, from Debian's packages.

Both "nodes" are slurmd daemons on 127.0.0.1 (``slurmd -N n1``, ``-N n2``)
next to one slurmctld and a private munged; every file lives under one
folder. Needs root. By hand::

    python tests/e2e/slurm_cluster.py up /tmp/slurm     # prints the SLURM_CONF to export
    python tests/e2e/slurm_cluster.py down /tmp/slurm
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
CTLD_PORT = 16817
SLURMD_PORTS = (17001, 17002)
# A requeued job may start again only after the credential lifetime (default
# 120 s); short here so that requeue tests stay short.
CRED_EXPIRE_S = 10


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be brought up here (not root, packages missing...)."""


def install_packages(timeout_s: float = 600) -> None:
    """apt-get the daemons and clients when missing."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("Slurm is not installed and apt-get cannot install it (needs root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")


def slurm_conf(root: Path) -> str:
    host = socket.gethostname()
    return f"""\
ClusterName=mtraintest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORTS[0]}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock,cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={SLURMD_PORTS[0]}-{SLURMD_PORTS[1]} CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class LocalSlurmCluster:
    """Start with :meth:`start`, always :meth:`stop` (also after a failed start)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def start(self, timeout_s: float = 60) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("the test cluster runs its daemons as root")
        install_packages()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(slurm_conf(self.root))
        self._daemon(["munged", "-F", "-f", f"--key-file={key}", f"--socket={self.root}/munge.sock",
                      f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/log/munged.log",
                      f"--seed-file={self.root}/munged.seed"], "munged")
        self._wait(lambda: (self.root / "munge.sock").exists(), timeout_s, "munged did not create its socket")
        self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in ("n1", "n2"):
            self._daemon(["slurmd", "-D", "-N", node, "-f", str(self.conf)], node)
        self._wait(self._nodes_idle, timeout_s, "the nodes did not become idle")

    def _daemon(self, cmd: list[str], name: str) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "w")
        # Own session: a Ctrl-C at the terminal does not reach the daemons first.
        self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True))

    def _nodes_idle(self) -> bool:
        for proc in self.daemons:
            if proc.poll() is not None:
                raise ClusterUnavailable(f"{proc.args[0]} exited with {proc.returncode}; see {self.root}/log")
        done = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return done.returncode == 0 and states.get("n1") == "idle" and states.get("n2") == "idle"

    @staticmethod
    def _wait(ready, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise ClusterUnavailable(message)
            time.sleep(0.5)

    def job_state(self, job_id: str) -> str:
        done = self.run("scontrol", "show", "job", job_id, check=False)
        for field in done.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(self, job_id: str, timeout_s: float) -> str:
        """Wait for a terminal state (a requeued job passes through PENDING)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job_state(job_id)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout_s} s")
            time.sleep(0.5)

    def cancel_all_jobs(self, timeout_s: float = 30) -> None:
        """Cancel every job and wait until the queue is empty (the job steps
        have ended), so that no task outlives the daemons."""
        if self.run("scancel", "--full", "--user", "root", check=False).returncode != 0:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            queue = self.run("squeue", "-h", "-o", "%i", check=False)
            if queue.returncode != 0 or not queue.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons."""
        ctld_alive = len(self.daemons) > 1 and self.daemons[1].poll() is None
        if ctld_alive:
            self.cancel_all_jobs()
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.daemons):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.daemons.clear()


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[1] not in ("up", "down"):
        sys.exit(__doc__)
    cluster = LocalSlurmCluster(Path(argv[2]))
    if argv[1] == "up":
        cluster.start()
        # The daemons run in their own sessions and outlive this process.
        (cluster.root / "pids").write_text(" ".join(str(p.pid) for p in cluster.daemons))
        print(f"export SLURM_CONF={cluster.conf}")
        return
    cluster.cancel_all_jobs()
    for pid in (cluster.root / "pids").read_text().split():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    main(sys.argv)

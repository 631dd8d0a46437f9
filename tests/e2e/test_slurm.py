"""Training jobs on a real two-node Slurm cluster (tests/e2e/slurm_cluster.py).

The tiny model on 2 nodes x 2 ranks (pp=2 DualPipe, ep=2, gloo), submitted
the two ways users submit: ``mtrain-train -m hydra/launcher=slurm`` (one task
per rank through submitit) and a batch script from ``mtrain-sbatch``. The
preemption tests send the job its time-limit warning (SIGUSR1) mid-run: the
job must checkpoint, requeue itself and finish with exactly the losses of the
uninterrupted run (fp32 on CPU is deterministic, resume is bit-exact).
"""
from __future__ import annotations

import json
import math
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import ClusterUnavailable, LocalSlurmCluster

pytestmark = pytest.mark.slow

STEPS = 10
TINY = [
    "cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.pp=2", "parallel.ep=2",
    "parallel.schedule=dualpipe", "parallel.num_microbatches=4", "parallel.backend=gloo",
    f"train.steps={STEPS}", "model.num_layers=4", "train.micro_batch_size=1", "data.seq_len=32",
    "train.warmup_steps=1", "logging.wandb=false", "logging.progress=false",
    "train.collective_timeout_s=60", "checkpoint.interval=100",
]
# The test nodes n1/n2 are names for 127.0.0.1 that do not resolve; the job
# inherits this from the submitting environment (sbatch --export=ALL).
JOB_ENV = {"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
# The CPU test nodes have no GPUs to ask for.
HYDRA_SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.timeout_min=10"]
JOB_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'mtrain[slurm]'")
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (ClusterUnavailable, subprocess.SubprocessError, OSError) as e:
        cluster.stop()
        pytest.skip(f"cannot start a Slurm test cluster here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def job_env(cluster: LocalSlurmCluster) -> dict[str, str]:
    return {**cluster.env, **JOB_ENV}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


class Submitter:
    """``mtrain-train -m hydra/launcher=slurm ...`` in the background, its
    output read line by line (it blocks until the job has finished)."""

    def __init__(self, cluster: LocalSlurmCluster, tmp: Path):
        # A sweep's job runs in its own folder under hydra.sweep.dir, which is its run_dir.
        cmd = [sys.executable, "-m", "mtrain.cli.train", *HYDRA_SLURM, f"hydra.sweep.dir={tmp / 'sweep'}", *TINY]
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=job_env(cluster), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def job_id(self, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.output.append(line)
            match = re.match(r"submitted Slurm job (\S+):", line)
            if match:
                return match.group(1)
        raise AssertionError("no job id printed:\n" + "".join(self.output))

    def wait(self, timeout_s: float) -> str:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        time.sleep(0.2)
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)


def job_dir(tmp: Path) -> Path:
    """The run dir of the Hydra-submitted job: the sweep's first job folder."""
    return tmp / "sweep" / "0"


def check_finished_run(run_dir: Path) -> list[float]:
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses)
    assert (run_dir / "checkpoints" / f"step_{STEPS:06d}").is_dir()
    assert (run_dir / "checkpoints" / "latest").exists()
    return losses


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """One uninterrupted Hydra-submitted run: (submitter output, job id, run dir)."""
    tmp = tmp_path_factory.mktemp("hydra_straight")
    submitter = Submitter(cluster, tmp)
    job_id = submitter.job_id()
    output = submitter.wait(JOB_TIMEOUT_S)
    assert submitter.proc.returncode == 0, output
    return output, job_id, tmp


def test_hydra_submit_runs_one_task_per_rank_on_two_nodes(cluster, uninterrupted):
    output, job_id, tmp = uninterrupted
    check_finished_run(job_dir(tmp))
    # The results are written just before the tasks end.
    assert cluster.wait_job(job_id, 30) == "COMPLETED"
    folder = tmp / "sweep" / ".submitit" / job_id
    script = (folder / f"{job_id}_submission.sh").read_text()
    for option in ("--nodes=2", "--ntasks-per-node=2", "--signal=USR1@", "--requeue"):
        assert option in script, option
    assert "--gpus-per-node" not in script
    # submitit's first log line of each task names its node and rank.
    starts = [(folder / f"{job_id}_{r}_log.out").read_text().splitlines()[0] for r in range(4)]
    placement = [re.search(r"node=(\d)\(2\), global_rank=(\d)\(4\)", s).groups() for s in starts]
    assert sorted(placement) == [("0", "0"), ("0", "1"), ("1", "2"), ("1", "3")]
    assert str(folder / f"{job_id}_0_log.out") in output


def preempt(cluster: LocalSlurmCluster, job_id: str, run_dir: Path) -> None:
    """The time-limit warning, sent once the trainer is past its first step."""
    wait_for(lambda: len(read_metrics(run_dir)) >= 1, JOB_TIMEOUT_S, "the first step")
    cluster.run("scancel", "--signal=USR1", job_id)


def check_requeued_and_resumed(cluster, job_id: str, run_dir: Path, reference: list[float]) -> None:
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    stopped = re.search(r"stopped at step (\d+); checkpoint written", rank0)
    assert stopped, rank0
    step = int(stopped.group(1))
    assert 1 <= step < STEPS
    assert f"requeued Slurm job {job_id}" in rank0
    assert f"at step {step}" in rank0.split("requeued Slurm job")[1]  # "resumed from ... at step k"
    assert re.search(r"Restarts=1\b", cluster.run("scontrol", "show", "job", job_id).stdout)
    assert check_finished_run(run_dir) == reference


def test_hydra_job_requeues_on_warning_and_resumes_exactly(cluster, uninterrupted, tmp_path):
    reference = check_finished_run(job_dir(uninterrupted[2]))
    submitter = Submitter(cluster, tmp_path)
    job_id = submitter.job_id()
    preempt(cluster, job_id, job_dir(tmp_path))
    # The launcher waits through the requeue for the second attempt's result.
    output = submitter.wait(240)
    assert submitter.proc.returncode == 0, output
    assert cluster.wait_job(job_id, 30) == "COMPLETED"
    check_requeued_and_resumed(cluster, job_id, job_dir(tmp_path), reference)


def test_sbatch_script_requeues_on_warning_and_resumes_exactly(cluster, uninterrupted, tmp_path):
    reference = check_finished_run(job_dir(uninterrupted[2]))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mtrain.launch.sbatch", *TINY, f"run_dir={run_dir}",
           "hydra.launcher.gpus_per_node=null", "hydra.launcher.timeout_min=10",
           "--out", str(tmp_path / "job.sbatch"), "--log-dir", str(tmp_path / "logs"), "--submit"]
    done = subprocess.run(cmd, cwd=tmp_path, env=job_env(cluster), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job_id, log_file = re.search(r"submitted Slurm job (\d+): log (\S+)", done.stdout).groups()
    preempt(cluster, job_id, run_dir)
    assert cluster.wait_job(job_id, 240) == "COMPLETED", Path(log_file).read_text()
    check_requeued_and_resumed(cluster, job_id, run_dir, reference)
    # Both attempts wrote to the same log (open-mode=append).
    assert "restart 0" in Path(log_file).read_text() and "restart 1" in Path(log_file).read_text()

"""Requeue a Slurm job after the trainer stopped on the time-limit warning.

The job asks Slurm for SIGUSR1 some minutes before its time limit
(``--signal=USR1@<seconds>``, sent to every task). The trainer checkpoints at
the next step boundary on all ranks and returns; ``mtrain-train`` then calls
:func:`requeue_if_warned` on every rank: rank 0 runs ``scontrol requeue`` and
every rank leaves. (Code that runs ``Trainer.run()`` itself calls it the same
way after ``run()`` returns with ``trainer.stopped_early``.) Slurm puts the job back
in the queue under the same id, and the next start resumes from the
checkpoint (``checkpoint.resume=latest``).

SIGTERM means "stop": a cancelled job (``scancel``) or a preemption that
Slurm requeues by itself checkpoints and is not requeued from here.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from mtrain.parallel.groups import collective_device

log = logging.getLogger("mtrain")

REQUEUE_SIGNAL = signal.SIGUSR1
# Set to 0 in the job's environment to stop on the warning without requeueing.
REQUEUE_ENV = "MTRAIN_REQUEUE"


def slurm_job_id(environ: Mapping[str, str]) -> Optional[str]:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array
    element, else the job id; None outside a Slurm batch job."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_wanted(stop_signal: Optional[int], environ: Mapping[str, str]) -> bool:
    """Requeue when the stop came from the warning signal inside a Slurm job
    whose environment does not opt out."""
    return (stop_signal == REQUEUE_SIGNAL and slurm_job_id(environ) is not None
            and environ.get(REQUEUE_ENV, "1") != "0")


def agreed_stop_signal(stop_signal: Optional[int]) -> Optional[int]:
    """The signal every rank acts on. SIGTERM (15) outranks SIGUSR1 (10): if
    any rank was told to stop for good, nobody requeues."""
    if not (dist.is_available() and dist.is_initialized()):
        return stop_signal
    # On the device NCCL takes (a CPU tensor fails there); gloo keeps it on the CPU.
    value = torch.tensor([stop_signal or 0], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item()) or None


def requeue_job(job_id: str, timeout_s: float = 60.0) -> None:
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=timeout_s,
                   capture_output=True, text=True)


def requeue_if_warned(stop_signal: Optional[int], environ: Mapping[str, str] | None = None) -> None:
    """Call on every rank after the stop checkpoint is complete.

    Returns when the job is not to be requeued. Otherwise rank 0 requeues the
    job and every rank raises ``SystemExit(0)``: the process ends without
    reporting a result, so a waiting submitit launcher keeps waiting for the
    requeued run instead of taking this attempt as the job's end.
    """
    env = os.environ if environ is None else environ
    signum = agreed_stop_signal(stop_signal)  # also a barrier: every rank's checkpoint is done
    if not requeue_wanted(signum, env):
        return
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    requeued = _requeue_from_rank0(slurm_job_id(env)) if rank == 0 else False
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([1 if requeued else 0], device=collective_device())
        dist.broadcast(flag, src=0)
        requeued = bool(flag.item())
    if requeued:
        raise SystemExit(0)


def _requeue_from_rank0(job_id: str) -> bool:
    try:
        requeue_job(job_id)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.error("could not requeue Slurm job %s: %s; resubmit it to resume", job_id, detail)
        return False
    log.warning("requeued Slurm job %s; it resumes from the checkpoint just written", job_id)
    return True

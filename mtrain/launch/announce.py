"""Tell the person who ran ``mtrain-train -m hydra/launcher=slurm`` which
Slurm jobs their command submitted and where each job's logs are.

The submitit launcher submits, then blocks until every job has finished,
printing nothing. This Hydra callback watches submitit's folder
(``<sweep>/.submitit``), where each job is filed under its id right after
``sbatch`` returns, and prints one line per new job while the launcher waits.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

POLL_S = 0.5


def submitted_jobs(submitit_dir: Path) -> list[str]:
    """Ids of the jobs filed under submitit's folder (one sub-folder each)."""
    if not submitit_dir.is_dir():
        return []
    return sorted(p.name for p in submitit_dir.iterdir()
                  if p.is_dir() and (p / f"{p.name}_submitted.pkl").exists())


def batch_script(submitit_dir: Path, job_id: str) -> Path:
    """A job's batch script; the elements of a sweep (a job array
    ``<array>_<index>``) share the array's."""
    own = submitit_dir / job_id / f"{job_id}_submission.sh"
    array = job_id.split("_")[0]
    return own if own.exists() else submitit_dir / array / f"{array}_submission.sh"


def job_line(submitit_dir: Path, job_id: str) -> str:
    folder = submitit_dir / job_id
    return (f"submitted Slurm job {job_id}: rank 0 log {folder / f'{job_id}_0_log.out'} "
            f"(rank N: {job_id}_N_log.out), batch script {batch_script(submitit_dir, job_id)}")


class JobAnnouncer:
    """Prints each job id once, from a background thread, until stopped."""

    def __init__(self, submitit_dir: Path, emit: Callable[[str], Any] = print):
        self.submitit_dir = submitit_dir
        self.emit = emit
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="slurm-job-announcer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.announce_new()

    def announce_new(self) -> None:
        for job_id in self._new(submitted_jobs(self.submitit_dir)):
            self.emit(job_line(self.submitit_dir, job_id))

    def _new(self, job_ids: Iterable[str]) -> list[str]:
        fresh = [j for j in job_ids if j not in self.seen]
        self.seen.update(fresh)
        return fresh

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            self.announce_new()


class AnnounceSlurmJobs(Callback):
    """Hydra callback (see configs/hydra/launcher/slurm.yaml)."""

    def __init__(self) -> None:
        self.announcer: JobAnnouncer | None = None

    def __getstate__(self) -> dict:
        # The launcher pickles Hydra's callbacks into every job; the watcher
        # thread stays with the submitting process.
        return {"announcer": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # submitit_folder ends in the job id placeholder: <root>/%j
        root = Path(str(config.hydra.launcher.submitit_folder)).parent
        print(f"submitting to Slurm; sweep folder {config.hydra.sweep.dir}; waiting for the jobs to finish",
              flush=True)
        self.announcer = JobAnnouncer(root, emit=lambda line: print(line, flush=True))
        self.announcer.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.announcer is not None:
            self.announcer.stop()
        print("all Slurm jobs of this sweep have finished", flush=True)

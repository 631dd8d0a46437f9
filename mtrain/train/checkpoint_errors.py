"""Checkpoint failures a run stops on with a message instead of a traceback.

:class:`CheckpointError` is what ``mtrain-train`` reports in plain words
(exit status 1): a refused resume (:class:`ResumeRefused`) or a save that
failed on storage (:class:`CheckpointSaveError`, e.g. a full disk). A storage
failure is an ``OSError`` anywhere in an exception's chain, including the
per-rank failures DCP gathers into one ``CheckpointException``.
"""
from __future__ import annotations

import errno as errnos
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException

NO_SPACE = (errnos.ENOSPC, errnos.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint problem the run stops on; the message says what and how to fix it."""


class ResumeRefused(CheckpointError):
    """The checkpoint directory holds checkpoints, but the run cannot continue any
    of them and starting over would overwrite them."""


class CheckpointSaveError(CheckpointError):
    """A save failed on storage on some rank. Its temporary directory is
    removed; the previous checkpoint and ``latest`` are untouched."""

    def __init__(self, message: str, step: int, errno: Optional[int]):
        super().__init__(message)
        self.step = step
        self.errno = errno

    @property
    def no_space(self) -> bool:
        return self.errno in NO_SPACE


@dataclass(frozen=True)
class Failure:
    """What went wrong on one rank, small and picklable for the other ranks."""

    rank: int
    message: str
    errno: Optional[int] = None  # set for storage failures

    @classmethod
    def of(cls, rank: int, exc: BaseException) -> "Failure":
        found = storage_failure(rank, exc)
        return found or cls(rank, f"{type(exc).__name__}: {exc}")


def storage_failure(rank: int, exc: BaseException) -> Optional[Failure]:
    """The first ``OSError`` behind ``exc`` (itself, its causes, or DCP's
    per-rank failures, lowest rank first), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return Failure(rank, str(exc), exc.errno)
        if isinstance(exc, CheckpointException):
            for failed_rank, (inner, _) in sorted(exc.failures.items()):
                found = storage_failure(failed_rank, inner)
                if found:
                    return found
        exc = exc.__cause__ or exc.__context__
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _free_space(root: Path) -> str:
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def save_error(root: Path, step: int, failure: Failure, previous: Optional[str]) -> CheckpointSaveError:
    """One line: what failed where, the free space, the fix, what is intact."""
    if failure.errno in NO_SPACE:
        what = "no space left"
        fix = ("free space there, lower checkpoint.keep_last, or set checkpoint.dir to a filesystem with room "
               "for another checkpoint")
    else:
        what, fix = "a storage error", f"check the filesystem under {root}"
    intact = f"{previous} (named in latest) is intact" if previous else "no earlier checkpoint was committed"
    message = (f"checkpoint of step {step} not saved: {what} (rank {failure.rank}: {failure.message}); "
               f"{root} has {_free_space(root)}; {fix}; {intact}")
    return CheckpointSaveError(message, step, failure.errno)

"""One clear line per failure, on the console once and in every rank's log.

A command's work runs under :func:`reporting_failures`. What it catches:

* **Agreed errors** (a config error, a refused resume, a failed save): every
  rank raises the same message together. Rank 0 prints it; every rank's log
  gets it. No traceback: the message names the field, file or checkpoint and
  the fix.
* **Known errors** (a damaged or missing data file, a missing optional
  package, a full disk, a file that cannot be written, too many bad steps):
  the failing rank prints ``rank R: <message>`` (another rank may not have
  failed, or failed differently) and logs it. No traceback either.
* **Anything else**: the full traceback goes to the rank's log (stderr when
  no log exists yet), and the console gets one line pointing there.

The exit status is 2 for a config error and 1 otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from typing import Iterator

import torch.distributed as dist

from mtrain.config.validate import ConfigError
from mtrain.data.batching import BatchConfigError
from mtrain.data.blend import BlendError
from mtrain.data.indexed import CorruptDatasetError
from mtrain.parallel.env import detect_env
from mtrain.train.checkpoint_errors import CheckpointError
from mtrain.train.checkpoint_files import CorruptCheckpointError
from mtrain.train.hf_import import HFCheckpointError
from mtrain.train.trainer import TrainingAborted

AGREED = (ConfigError, CheckpointError)
# OSError covers a missing or unwritable file and a full disk; ImportError a missing optional package.
KNOWN = (CorruptDatasetError, BatchConfigError, BlendError, CorruptCheckpointError, HFCheckpointError,
         TrainingAborted, ImportError, OSError)


def _log() -> logging.Logger | None:
    log = logging.getLogger("mtrain")
    return log if log.handlers else None


def _log_file(log: logging.Logger | None) -> str:
    files = [h.baseFilename for h in (log.handlers if log else []) if isinstance(h, logging.FileHandler)]
    return files[0] if files else ""


def report(error: BaseException, rank: int) -> int:
    """Say ``error`` as described above; returns the exit status."""
    log = _log()
    message = str(error) or type(error).__name__
    if isinstance(error, AGREED):
        if log is not None:
            log.error("%s", message)
        if rank == 0 and (log is None or not _console(log)):
            print(message, file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    if isinstance(error, KNOWN):
        line = f"rank {rank}: {message}"
        if log is not None:
            log.error("%s", line)
        if log is None or not _console(log) or rank != 0:
            print(line, file=sys.stderr)
        return 1
    where = _log_file(log)
    if log is not None:
        log.error("rank %d failed:\n%s", rank, "".join(traceback.format_exception(error)))
    else:
        traceback.print_exception(error, file=sys.stderr)
    print(f"rank {rank}: {type(error).__name__}: {message}" + (f" (traceback in {where})" if where else ""),
          file=sys.stderr)
    return 1


def _console(log: logging.Logger) -> bool:
    """Whether ``log`` already writes to the console (rank 0's does)."""
    return any(type(h) is logging.StreamHandler for h in log.handlers)


@contextlib.contextmanager
def reporting_failures() -> Iterator[None]:
    """Run the body; on a failure, report it (:func:`report`) and exit with its
    status. The process group, if any, is destroyed on the way out."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 -- the top of a command: every failure is reported
        sys.exit(report(e, detect_env().rank))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

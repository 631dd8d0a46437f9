"""Run a function on N gloo processes on 127.0.0.1.

Workers are forked from the calling process (which has already imported
torch), so starting 8 ranks costs a fraction of a second instead of the ~10 s
each spawned interpreter needs to import torch. A failure on any rank raises
:class:`RankFailure` carrying that rank's traceback; a hang raises
:class:`RankTimeout` naming the ranks that did not finish, with their Python
stacks. Collectives get a gloo timeout just below the harness timeout, so a
stuck collective usually fails first with the operation named.
"""
from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable


class RankFailure(RuntimeError):
    """A rank raised (or died); the message holds its traceback."""


class RankTimeout(TimeoutError):
    """Some ranks did not finish in time; the message names them with their stacks."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, stack_file, gloo_timeout_s, env):
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    with open(stack_file, "w") as stacks:
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
        try:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=gloo_timeout_s),
            )
            # Plain pickle: torch's queue reducers would pass tensors as shared
            # memory handles that die with this process.
            results.put((rank, "ok", pickle.dumps(fn(*args))))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
        finally:
            results.close()
            results.join_thread()
    # Skip interpreter teardown: other ranks may be gone and a clean
    # destroy_process_group could block on them.
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the results by rank.

    ``fn`` runs after ``init_process_group``; it reads its rank from
    ``torch.distributed.get_rank()``. Results must be picklable.
    """
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    gloo_timeout = max(timeout - 10.0, timeout * 0.75)
    with tempfile.TemporaryDirectory(prefix="mtrain-ranks-") as tmp:
        stack_files = [Path(tmp) / f"rank{r}.stack" for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, fn, args, results, str(stack_files[r]), gloo_timeout, dict(env or {})),
                name=f"rank{r}", daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, stack_files, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)


def _collect(procs, results, stack_files, timeout):
    world_size = len(procs)
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    first_error_at = None
    while len(outcome) < world_size:
        now = time.monotonic()
        # After the first failure give the others a moment to report theirs.
        if first_error_at is not None and now > first_error_at + 2.0:
            break
        if now > deadline:
            break
        try:
            rank, status, value = results.get(timeout=0.1)
            outcome[rank] = (status, value)
            if status == "error" and first_error_at is None:
                first_error_at = time.monotonic()
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if r not in outcome and not p.is_alive()]
            for r in dead:
                # A last look: the result may still be in the pipe.
                time.sleep(0.2)
                try:
                    while True:
                        rank, status, value = results.get_nowait()
                        outcome[rank] = (status, value)
                except queue_mod.Empty:
                    pass
                if r not in outcome:
                    outcome[r] = ("error", f"rank {r} died with exit code {procs[r].exitcode}")
                    first_error_at = first_error_at or time.monotonic()

    errors = {r: v for r, (s, v) in sorted(outcome.items()) if s == "error"}
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed (first: rank {min(errors)}):\n{text}")
    missing = [r for r in range(world_size) if r not in outcome]
    if missing:
        for r in missing:
            if procs[r].is_alive():
                os.kill(procs[r].pid, signal.SIGUSR1)
        time.sleep(0.5)
        stacks = "\n".join(
            f"--- rank {r} stack ---\n{stack_files[r].read_text() if stack_files[r].exists() else '(none)'}"
            for r in missing
        )
        raise RankTimeout(f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s:\n{stacks}")
    return [pickle.loads(outcome[r][1]) for r in range(world_size)]

"""Naming a hang: which rank did not arrive, and where every thread was.

A stopped or stuck rank makes the others wait in a collective until its
timeout, and the error then names a healthy rank. The watchdog is a thread
on every rank that expects each training step to end within a budget. Every
rank publishes the step it is in to a small key-value store the launch
already runs (``MASTER_ADDR:MASTER_PORT``, through a client of its own with
a short timeout). When a step overruns, the thread logs, on its rank:
the step and how long it has run, the ranks that have gone silent (their
watchdog thread beats every poll: a stopped or frozen process stops beating)
or have not reached that step, so the one that hangs is named by the others
even when it can no longer say anything itself, and the Python stack of
every thread of this rank. It
reports once per step and never interferes with training.

Budget (``train.watchdog_s``): null is ten times the median of the recent
steps, at least 60 s, judged from the fourth step on (the first ones compile
and warm caches); a number fixes it; 0 turns the watchdog off.
"""
from __future__ import annotations

import datetime
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from typing import Optional

import torch.distributed as dist

log = logging.getLogger("mtrain")

KEY = "mtrain/watchdog/step/{}"  # the step a rank is in
ALIVE = "mtrain/watchdog/alive/{}"  # when its watchdog last beat (wall clock)
FACTOR, FLOOR_S, WARMUP_STEPS = 10.0, 60.0, 3
SILENT_POLLS = 3  # a rank whose beat is this many polls old is stopped or frozen


def heartbeat_store(timeout_s: float = 5.0):
    """A client of the launch's store, with its own short timeout (None when there is none)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 -- without a store the watchdog still dumps this rank's stacks
        log.warning("watchdog: no heartbeat store at %s:%s (%s); a hang will not name the other ranks", addr, port, e)
        return None


def thread_stacks() -> str:
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)).rstrip()
                     for ident, frame in frames.items())


class Watchdog:
    def __init__(self, rank: int, world: int, budget_s: Optional[float] = None, store=None, poll_s: float = 2.0):
        self.rank, self.world, self.fixed, self.store, self.poll_s = rank, world, budget_s, store, poll_s
        self._times: list[float] = []
        self._step: Optional[int] = None
        self._since: Optional[float] = None
        self._reported: Optional[int] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mtrain-watchdog", daemon=True)
        self._thread.start()

    def budget(self) -> Optional[float]:
        """Seconds a step may take before it is reported (None: not judged yet)."""
        if self.fixed:
            return self.fixed
        if len(self._times) < WARMUP_STEPS:
            return None
        return max(FLOOR_S, FACTOR * statistics.median(self._times[-20:]))

    def step_started(self, step: int) -> None:
        with self._lock:
            self._step, self._since = step, time.monotonic()
        if self.store is not None:
            try:
                self.store.set(KEY.format(self.rank), str(step))
            except Exception:  # noqa: BLE001 -- a lost store must not fail training
                self.store = None

    def step_finished(self) -> None:
        with self._lock:
            if self._since is not None:
                self._times.append(time.monotonic() - self._since)
            self._step = self._since = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        if self.store is not None:
            try:
                self.store.set(ALIVE.format(self.rank), repr(time.time()))
            except Exception:  # noqa: BLE001 -- a lost store must not fail training
                self.store = None

    def _watch(self) -> None:
        self._beat()
        while not self._stop.wait(self.poll_s):
            self._beat()
            with self._lock:
                step, since, budget = self._step, self._since, self.budget()
            if step is None or budget is None or step == self._reported:
                continue
            ran = time.monotonic() - since
            if ran > budget:
                self._reported = step
                log.error("watchdog: step %d has run %.0f s, over its budget of %.0f s (train.watchdog_s); %s. "
                          "Stacks of rank %d:\n%s", step, ran, budget, self._behind(step), self.rank, thread_stacks())

    def _read(self, key: str) -> Optional[str]:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _behind(self, step: int) -> str:
        """Which ranks went silent or have not reached ``step``, from their heartbeats."""
        if self.store is None:
            return "no heartbeat store to tell which ranks did not arrive"
        silent, behind, unknown = [], [], []
        now = time.time()
        for r in range(self.world):
            try:
                seen, alive = self._read(KEY.format(r)), self._read(ALIVE.format(r))
            except Exception:  # noqa: BLE001 -- the store's host may be the stopped rank
                unknown.append(r)
                continue
            quiet = now - float(alive) if alive is not None else None
            at = f"at step {seen}" if seen is not None else "no step started"
            if quiet is not None and quiet > SILENT_POLLS * self.poll_s:
                silent.append(f"{r} ({at}, silent for {quiet:.0f} s: stopped or frozen)")
            elif seen is None or int(seen) < step:
                behind.append(f"{r} ({at})")
        if unknown:
            return f"the heartbeat store did not answer for ranks {unknown} (its host may be the one stopped)"
        found = ([f"ranks gone silent: {', '.join(silent)}"] if silent else []) + \
            ([f"ranks not at this step: {', '.join(behind)}"] if behind else [])
        return "; ".join(found) or "every rank is alive and in this step (a collective inside it is slow or stuck)"

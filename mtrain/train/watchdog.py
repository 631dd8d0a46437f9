"""Naming a hang: which rank did not arrive, and where every thread was.

A stopped or stuck rank makes the others wait in a collective until its
timeout, and the error then names a healthy rank. The watchdog is a thread
on every rank that expects each training step to end within a budget. Every
rank publishes the step it is in to a small key-value store the launch
already runs (``MASTER_ADDR:MASTER_PORT``, through a client of its own;
every request gets 5 s, since a store whose host is the stopped rank never
answers, and such a store is not asked again). When a step overruns, the
thread logs, on its rank: the step and how long it has run, the ranks that have gone silent (their
watchdog thread beats every poll: a stopped or frozen process stops beating)
or have not reached that step, so the one that hangs is named by the others
even when it can no longer say anything itself, and the Python stack of
every thread of this rank. It
reports once per step and never interferes with training.

Budget (``train.watchdog_s``): null is ten times the median of the recent
steps, at least 60 s, judged from the fourth step on (the first ones compile
and warm caches); a number fixes it; 0 turns the watchdog off. A step runs
from its start to the ranks' agreement on stopping (every collective of it).
The collective timeout sized to the step (``train.collective_timeout_s=null``,
:class:`mtrain.parallel.groups.CollectiveTimeout`) stays at least 15 s above
this budget, so the report comes before the error.
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

from mtrain.parallel.groups import TIMEOUT_FACTOR, TIMEOUT_RECENT, TIMEOUT_WARMUP

log = logging.getLogger("mtrain")

KEY = "mtrain/watchdog/step/{}"  # the step a rank is in
ALIVE = "mtrain/watchdog/alive/{}"  # when its watchdog last beat (wall clock)
FLOOR_S = 60.0
SILENT_POLLS = 3  # a rank whose beat is this many polls old is stopped or frozen
# How long the store may take to answer. A store whose host is stopped never
# answers, and its client's timeout does not cover a reply that never comes.
STORE_WAIT_S = 5.0


class StoreSilent(RuntimeError):
    """The heartbeat store did not answer (or failed); it is not asked again."""


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
    def __init__(self, rank: int, world: int, budget_s: Optional[float] = None, store=None, poll_s: float = 2.0,
                 store_wait_s: float = STORE_WAIT_S):
        self.rank, self.world, self.fixed, self.store, self.poll_s = rank, world, budget_s, store, poll_s
        self.store_wait_s = store_wait_s
        self._store_lost: Optional[str] = None  # why the store is no longer asked
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
        if len(self._times) < TIMEOUT_WARMUP:  # judged like the collective timeout
            return None
        return max(FLOOR_S, TIMEOUT_FACTOR * statistics.median(self._times[-TIMEOUT_RECENT:]))

    def step_started(self, step: int) -> None:
        with self._lock:
            self._step, self._since = step, time.monotonic()
        try:  # now, before this rank can stop in the step; a store that does not answer costs one wait, once
            self._ask(lambda store: store.set(KEY.format(self.rank), str(step)))
        except StoreSilent:
            pass

    def step_finished(self) -> None:
        with self._lock:
            if self._since is not None:
                self._times.append(time.monotonic() - self._since)
            self._step = self._since = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _ask(self, question):
        """``question(store)``, answered within ``store_wait_s`` or :class:`StoreSilent`
        (then the store is dropped: a thread stuck on it stays stuck, no other joins it)."""
        store = self.store
        if store is None:
            raise StoreSilent(self._store_lost or "no heartbeat store")
        answer: dict = {}

        def ask():
            try:
                answer["value"] = question(store)
            except Exception as e:  # noqa: BLE001 -- a lost store must not fail training
                answer["error"] = e

        asker = threading.Thread(target=ask, name="mtrain-watchdog-store", daemon=True)
        asker.start()
        asker.join(self.store_wait_s)
        if "value" in answer:
            return answer["value"]
        self.store = None
        self._store_lost = (f"the heartbeat store failed ({answer['error']})" if "error" in answer else
                            f"the heartbeat store did not answer within {self.store_wait_s:.0f} s "
                            f"(its host may be the one stopped)")
        log.warning("watchdog: %s; a hang will not name the other ranks", self._store_lost)
        raise StoreSilent(self._store_lost)

    def _beat(self) -> None:
        try:
            self._ask(lambda store: store.set(ALIVE.format(self.rank), repr(time.time())))
        except StoreSilent:
            pass

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

    @staticmethod
    def _read(store, key: str) -> Optional[str]:
        return store.get(key).decode() if store.check([key]) else None

    def _behind(self, step: int) -> str:
        """Which ranks went silent or have not reached ``step``, from their heartbeats."""
        if self.store is None and self._store_lost is None:
            return "no heartbeat store to tell which ranks did not arrive"
        try:
            beats = self._ask(lambda store: [(self._read(store, KEY.format(r)), self._read(store, ALIVE.format(r)))
                                             for r in range(self.world)])
        except StoreSilent as e:
            return f"{e}, so the ranks that did not arrive are unknown"
        silent, behind = [], []
        now = time.time()
        for r, (seen, alive) in enumerate(beats):
            quiet = now - float(alive) if alive is not None else None
            at = f"at step {seen}" if seen is not None else "no step started"
            if quiet is not None and quiet > SILENT_POLLS * self.poll_s:
                silent.append(f"{r} ({at}, silent for {quiet:.0f} s: stopped or frozen)")
            elif seen is None or int(seen) < step:
                behind.append(f"{r} ({at})")
        found = ([f"ranks gone silent: {', '.join(silent)}"] if silent else []) + \
            ([f"ranks not at this step: {', '.join(behind)}"] if behind else [])
        return "; ".join(found) or "every rank is alive and in this step (a collective inside it is slow or stuck)"

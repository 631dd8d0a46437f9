"""The watchdog names the ranks that did not reach an overrunning step (from
heartbeats in a real TCPStore) and dumps this rank's stacks, once per step."""
import datetime
import logging
import multiprocessing as mp
import os
import signal
import time

import torch.distributed as dist

from mtrain.testing.distributed import free_port
from mtrain.train.watchdog import ALIVE, KEY, Watchdog


def test_an_overrunning_step_names_the_ranks_behind_with_stacks(caplog):
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=datetime.timedelta(seconds=5))
    store.set(KEY.format(1), "2")  # rank 1 is still in step 2, alive
    store.set(ALIVE.format(1), repr(time.time() + 60))
    store.set(KEY.format(2), "3")  # rank 2 reached step 3 but went silent 10 s ago
    store.set(ALIVE.format(2), repr(time.time() - 10))
    dog = Watchdog(rank=0, world=3, budget_s=0.3, store=store, poll_s=0.05)
    with caplog.at_level(logging.ERROR, logger="mtrain"):
        dog.step_started(3)
        time.sleep(1.0)
        dog.step_finished()
        dog.step_started(4)
        dog.step_finished()  # a step within budget says nothing
        time.sleep(0.3)
    dog.close()
    reports = [r.getMessage() for r in caplog.records if "watchdog" in r.getMessage()]
    assert len(reports) == 1, reports
    assert "step 3 has run" in reports[0] and "ranks not at this step: 1 (at step 2)" in reports[0]
    assert "ranks gone silent: 2 (at step 3, silent for 1" in reports[0]
    assert "thread MainThread" in reports[0] and "test_an_overrunning_step" in reports[0]


def test_budget_follows_the_steps_after_warmup():
    dog = Watchdog(rank=0, world=1, poll_s=10)
    assert dog.budget() is None
    dog._times = [0.5, 2.0, 1.0]
    assert dog.budget() == 60.0  # at least 60 s
    dog._times = [10.0, 12.0, 11.0, 9.0]
    assert dog.budget() == 105.0  # 10x the median
    dog.close()


def _host_store(port, ready):
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=30))
    ready.set()
    time.sleep(60)
    del store


def test_a_frozen_store_host_costs_one_wait_and_never_holds_up_training():
    # The store's host (rank 0 under Slurm) is the one stopped: every read would wait out the client's timeout.
    port, ctx = free_port(), mp.get_context("fork")
    ready = ctx.Event()
    host = ctx.Process(target=_host_store, args=(port, ready), daemon=True)
    host.start()
    try:
        assert ready.wait(20)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=1))
        os.kill(host.pid, signal.SIGSTOP)
        dog = Watchdog(rank=1, world=4, budget_s=100, store=store, poll_s=100, store_wait_s=1.0)
        start = time.monotonic()
        dog.step_started(3)  # training does not wait on the store
        said = dog._behind(3)
        took = time.monotonic() - start
        dog.close()
    finally:
        host.kill()
        host.join()
    assert "did not answer within 1 s (its host may be the one stopped)" in said
    assert took < 2.5, took  # one wait, not one per rank and key

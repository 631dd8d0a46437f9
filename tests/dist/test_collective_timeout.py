"""The collective timeout changes on live gloo groups: once sized to the steps,
a rank that stays away fails the other's collectives in about the new time
(2 s), not the one the groups were created with (30 s), and so does a
pipeline receive; inside a long operation (a checkpoint) a late rank is
waited for."""
import datetime
import time

import torch
import torch.distributed as dist

from mtrain.parallel.groups import TIMEOUT_WARMUP, CollectiveTimeout, create_groups
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.p2p import _Works
from mtrain.testing import run_distributed

CREATED_S, SIZED_S = 30.0, 2.0


def _one_rank_stays_away():
    rank = dist.get_rank()
    groups = create_groups(build_layout(2), timeout_s=CREATED_S)  # dp=2 over both ranks
    timeouts = CollectiveTimeout(None, startup_s=CREATED_S, floor_s=SIZED_S, groups=groups.process_groups)
    # A group of its own for the receive (a timed-out wait closes its group's connection to the absent rank).
    pipe = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=CREATED_S))
    for _ in range(TIMEOUT_WARMUP + 1):
        timeouts.step_done(0.01)  # fast steps: the floor decides
    x = torch.ones(1)
    with timeouts.long_operation():
        inside = timeouts.current_s
        if rank == 1:
            time.sleep(4.0)  # twice the sized timeout late
        dist.all_reduce(x, group=groups.group("dp"))
    if rank == 1:
        time.sleep(10.0)  # away for good (not exited: an exit would close the connections)
        return None
    waits = {}
    receive = lambda: _Works(dist.batch_isend_irecv([dist.P2POp(dist.irecv, torch.zeros(1), 1, pipe)])).wait()  # noqa: E731
    for name, wait in (("pipeline receive", receive),
                       ("dp", lambda: dist.all_reduce(torch.ones(1), group=groups.group("dp"))),
                       ("default", lambda: dist.all_reduce(torch.ones(1)))):
        start = time.monotonic()
        try:
            wait()
            waits[name] = (time.monotonic() - start, "completed")
        except RuntimeError as e:
            waits[name] = (time.monotonic() - start, str(e))
    return {"inside": inside, "after": timeouts.current_s, "sum": x.item(), "waits": waits}


def test_a_sized_timeout_fails_the_wait_for_an_absent_rank_in_the_new_time():
    out = run_distributed(_one_rank_stays_away, 2, timeout=CREATED_S + 10)[0]
    assert out["inside"] == CREATED_S and out["after"] == SIZED_S
    assert out["sum"] == 2.0  # the late rank was waited for inside the long operation
    for name, (waited, error) in out["waits"].items():
        assert "Timed out" in error, (name, error)
        assert 0.8 * SIZED_S <= waited < 3 * SIZED_S, (name, waited)


def _seconds(group) -> float:
    """What a gloo group's collectives wait now (read back from the backend)."""
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _train_and_watch_the_timeouts(run_dir):
    from mtrain.config.loading import load_config
    from mtrain.train.trainer import Trainer
    from tests.e2e.test_train import BASE

    cfg = load_config(BASE + ["parallel=single", "cluster.gpus_per_node=2", "parallel.pp=2", "train.steps=7",
                              "parallel.num_microbatches=2", "checkpoint.interval=6", "train.watchdog_s=3",
                              "train.collective_timeout_s=null", "train.collective_timeout_floor_s=4",
                              f"train.collective_timeout_startup_s={CREATED_S}", f"run_dir={run_dir}"])
    trainer = Trainer(cfg, run_dir)
    groups = [dist.distributed_c10d._get_default_group(), *trainer.groups.process_groups(),
              *trainer._channels.values()]
    seen = {"before_step": [], "in_save": []}
    step, save = trainer.train_step, trainer.checkpointer.save

    def watched_step():
        seen["before_step"].append(sorted({_seconds(g) for g in groups}))
        return step()

    def watched_save(*args, **kwargs):
        seen["in_save"].append(sorted({_seconds(g) for g in groups}))
        return save(*args, **kwargs)

    trainer.train_step, trainer.checkpointer.save = watched_step, watched_save
    trainer.run()
    seen["after_run"] = sorted({_seconds(g) for g in groups})
    seen["kinds"] = len(groups)
    return seen


def test_the_trainer_sizes_every_group_it_made_and_raises_them_around_checkpoints(tmp_path):
    seen = run_distributed(_train_and_watch_the_timeouts, 2, str(tmp_path), timeout=120)[0]
    assert seen["kinds"] >= 5  # the default group, the layout's groups, the pipeline's channels
    sized = 3.0 + 15.0  # the watchdog's 3 s budget + the margin, over the floor and 10x these steps
    starts = seen["before_step"]
    # Steps 1-4: unsized (the default group still has the harness's 110 s, the trainer's own groups theirs).
    assert starts[:TIMEOUT_WARMUP + 1] == [[CREATED_S, 110.0]] * (TIMEOUT_WARMUP + 1)
    assert starts[TIMEOUT_WARMUP + 1:] == [[sized]] * (7 - TIMEOUT_WARMUP - 1)  # every group, from step 5
    assert seen["in_save"] == [[CREATED_S], [CREATED_S]]  # steps 6 and 7 (the last)
    assert seen["after_run"] == [CREATED_S]

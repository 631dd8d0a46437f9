"""A rank stopped with SIGSTOP: the other rank's log names it (and its own
stacks), then the collective timeout sized to the steps ends the run, well
before the timeout the groups started with."""
import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from mtrain.config.loading import load_config
from mtrain.parallel.groups import REPORT_MARGIN_S
from mtrain.testing import run_distributed
from mtrain.testing.distributed import RankFailure
from tests.e2e.test_train import BASE

WATCHDOG_S, STARTUP_S, STOP_IN_STEP = 8, 40, 6  # the sized timeout: 8 + 15 s (steps of < 2 s)


def _train_until_rank1_stops(run_dir):
    import torch.distributed as dist

    from mtrain.train.trainer import Trainer

    cfg = load_config(BASE + ["parallel=single", "cluster.gpus_per_node=2", "parallel.dp=2", "train.steps=8",
                              f"train.watchdog_s={WATCHDOG_S}", "train.collective_timeout_s=null",
                              "train.collective_timeout_floor_s=2", f"train.collective_timeout_startup_s={STARTUP_S}",
                              f"run_dir={run_dir}"])
    trainer = Trainer(cfg, run_dir)
    step = trainer.train_step

    def stopping_step():
        if dist.get_rank() == 1 and trainer.step == STOP_IN_STEP - 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # as an operator's kill -STOP would
        return step()

    trainer.train_step = stopping_step
    return trainer.run()


def _logged_at(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_stopped_rank_is_named_by_the_others_before_the_timeout(tmp_path):
    # Rank 0 waits in a collective until its sized timeout fails it (the harness's own is 50 s).
    with pytest.raises(RankFailure, match="Timed out"):
        run_distributed(_train_until_rank1_stops, 2, str(tmp_path), timeout=STARTUP_S + 10)
    failed = time.time()
    lines = Path(tmp_path, "logs", "rank0.log").read_text().splitlines()
    sized = [line for line in lines if "collectives now time out after" in line]
    assert len(sized) == 1, lines
    timeout_s = float(re.search(r"after (\d+) s", sized[0]).group(1))
    assert timeout_s >= WATCHDOG_S + REPORT_MARGIN_S and timeout_s < STARTUP_S - 5
    report = [i for i, line in enumerate(lines) if "watchdog: step" in line]
    assert len(report) == 1, lines
    text = "\n".join(lines[report[0]:])
    assert f"watchdog: step {STOP_IN_STEP} has run" in text
    assert f"ranks gone silent: 1 (at step {STOP_IN_STEP}, silent for" in text and "stopped or frozen" in text
    assert "Stacks of rank 0:" in text and "thread MainThread" in text
    # The report came first, and the run ended about the sized timeout after the step began (the
    # report: its budget after), not the start-up timeout after.
    reported = _logged_at(lines[report[0]])
    assert 5 < failed - reported < timeout_s - WATCHDOG_S + 5

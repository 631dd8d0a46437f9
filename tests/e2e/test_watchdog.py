"""A rank stopped with SIGSTOP: the other rank's log names it (and its own
stacks) long before the collective timeout ends the run."""
import os
import signal
from pathlib import Path

import pytest

from mtrain.config.loading import load_config
from mtrain.testing import run_distributed
from mtrain.testing.distributed import RankFailure, RankTimeout
from tests.e2e.test_train import BASE


def _train_until_rank1_stops(run_dir):
    import torch.distributed as dist

    from mtrain.train.trainer import Trainer

    cfg = load_config(BASE + ["parallel=single", "cluster.gpus_per_node=2", "parallel.dp=2", "train.steps=6",
                              "train.watchdog_s=8", "train.collective_timeout_s=30", f"run_dir={run_dir}"])
    trainer = Trainer(cfg, run_dir)
    step = trainer.train_step

    def stopping_step():
        if dist.get_rank() == 1 and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGSTOP)  # as an operator's kill -STOP would
        return step()

    trainer.train_step = stopping_step
    return trainer.run()


def test_a_stopped_rank_is_named_by_the_others(tmp_path):
    # The run cannot finish: rank 0 waits in a collective until a timeout, and the harness ends it.
    with pytest.raises((RankFailure, RankTimeout)):
        run_distributed(_train_until_rank1_stops, 2, str(tmp_path), timeout=50)
    text = Path(tmp_path, "logs", "rank0.log").read_text()
    assert "watchdog: step 3 has run" in text
    assert "ranks gone silent: 1 (at step 3, silent for" in text and "stopped or frozen" in text
    assert "Stacks of rank 0:" in text and "thread MainThread" in text

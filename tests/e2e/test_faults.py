"""Stop requests, crashes mid-save and resumes, through the real trainer."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtrain.config.loading import load_config
from mtrain.testing import RankFailure, run_distributed
from tests.e2e.test_train import BASE, DUALPIPE_EP2, read_metrics, train


def _train_with_signal(overrides, run_dir, signal_rank, after_step):
    from mtrain.train.trainer import Trainer

    class Signalling(Trainer):
        def train_step(self):
            metrics = super().train_step()
            # Slurm may signal some ranks before others: only one rank gets it here.
            if self.rank == signal_rank and self.step == after_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return metrics

    cfg = load_config(BASE + list(overrides) + [f"run_dir={run_dir}"])
    return Signalling(cfg, run_dir).run()


def test_sigterm_on_one_rank_checkpoints_everywhere_and_exits_0(tmp_path):
    overrides = DUALPIPE_EP2 + ["train.steps=6", "checkpoint.interval=100", "cluster.gpus_per_node=4"]
    codes = run_distributed(_train_with_signal, 4, overrides, str(tmp_path), 3, 2, timeout=120)
    assert codes == [0, 0, 0, 0]
    assert sorted(read_metrics(tmp_path)) == [1, 2]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip().endswith("step_000002")
    # The next run picks up at step 3 and ends where an uninterrupted run ends.
    resumed = train(4, overrides, tmp_path)
    straight = train(4, overrides, tmp_path / "straight")
    assert [resumed[s]["loss"] for s in range(1, 7)] == [straight[s]["loss"] for s in range(1, 7)]


def _train_killed_during_save(overrides, run_dir, kill_at_step):
    from mtrain.train import checkpoint_files
    from mtrain.train.trainer import Trainer

    cfg = load_config(BASE + list(overrides) + [f"run_dir={run_dir}"])
    trainer = Trainer(cfg, run_dir)

    def crash(point):
        if point == "written" and trainer.step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # data on disk, not yet sealed or published

    checkpoint_files.fault_hook = crash
    return trainer.run()


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path):
    overrides = DUALPIPE_EP2 + ["train.steps=6", "checkpoint.interval=2", "cluster.gpus_per_node=4"]
    with pytest.raises(RankFailure, match="exit code -9"):
        run_distributed(_train_killed_during_save, 4, overrides, str(tmp_path), 4, timeout=120)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip().endswith("step_000002")
    assert (ckpts / "step_000004.tmp").exists() and not (ckpts / "step_000004").exists()
    resumed = train(4, overrides, tmp_path)
    straight = train(4, overrides, tmp_path / "straight")
    assert [resumed[s]["loss"] for s in range(1, 7)] == [straight[s]["loss"] for s in range(1, 7)]
    assert not (ckpts / "step_000004.tmp").exists()  # cleaned at the next save


def test_cli_sigterm_checkpoints_and_exits_0(tmp_path):
    """The console entry point itself, one process, a real SIGTERM from outside."""
    cmd = [sys.executable, "-m", "mtrain.cli.train", "parallel=single", "cluster.gpus_per_node=1",
           *BASE, "train.steps=100000", "checkpoint.interval=100000", f"run_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert (tmp_path / "checkpoints" / "latest").read_text().strip().endswith(f"step_{last:06d}")


def test_invalid_config_exits_2_before_starting(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mtrain.cli.train", "parallel.pp=3", f"run_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "parallel.pp" in out.stderr

"""Training through faults loses nothing: a run with one rank frozen by
SIGSTOP (its survivors name it, then time out in about 25 s: the collective
timeout is sized to the steps), killed with SIGKILL, stopped with SIGTERM and
restarted on a checkpoint with 4 KiB overwritten ends with a metrics.jsonl
equal step for step to an uninterrupted run's (tools/chaos_run.py; its
default draws the faults at random from a printed seed)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from chaos_run import chaos  # noqa: E402


def test_faults_are_survived_and_no_step_is_lost(tmp_path):
    report = chaos(tmp_path, steps=18, nproc=2, faults=5, seed=11, interval=4,
                   overrides=["parallel=single", "cluster.gpus_per_node=2", "parallel.dp=2"],
                   kinds_in_order=["stop", "kill9", "flip", "term"])
    assert report["faults_injected"] == report["faults_survived"] == 5  # the flip follows a clean stop
    kinds = [f.split()[0] for f in report["faults"]]
    assert kinds == ["stop", "kill9", "term", "flip", "term"]
    (stop,) = report["stops"]
    assert not stop["continued"]  # it landed between checkpoints: the survivor timed out
    assert stop["named_by"] == [1 - stop["rank"]]  # and its watchdog named the frozen rank first
    assert any(".corrupt-" in name for name in report["set_aside"])  # the damaged checkpoint, kept aside

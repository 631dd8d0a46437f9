"""The trainer's resume and save path on 2 gloo ranks (and once through the
CLI) with damaged checkpoints and a full disk: the ranks agree on the
checkpoint to continue, set damaged ones aside, refuse to start over on
checkpoints, never overwrite newer ones, and survive or stop cleanly on a
failed save."""
import errno
import os
import shutil
import subprocess
import sys

import pytest

from mtrain.config.loading import load_config
from mtrain.testing import run_distributed
from tests.e2e.test_train import BASE, read_metrics, train
from tests.unit.test_checkpoint_integrity import flip_4k, tree

EP2 = ["parallel.pp=1", "parallel.ep=2", "parallel.schedule=1f1b", "parallel.num_microbatches=2",
       "model.num_layers=2"]


def rank_logs(run_dir):
    return [(run_dir / "logs" / f"rank{r}.log").read_text() for r in range(2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Checkpoints of steps 2 and 4 (latest) of a 2-rank run."""
    run = tmp_path_factory.mktemp("trained")
    train(2, EP2 + ["train.steps=4", "checkpoint.interval=2"], run)
    return run / "checkpoints"


@pytest.fixture
def run_dir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "checkpoints")
    return tmp_path


def _train_reporting(overrides, run_dir, fail_step=None, fail_rank=1):
    """Train; a CheckpointError is returned as its message (so every rank's
    outcome is seen). With ``fail_step`` the disk is full on ``fail_rank``
    while DCP writes that step's checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from mtrain.train.checkpoint import CheckpointError
    from mtrain.train.trainer import Trainer

    try:
        trainer = Trainer(load_config(BASE + list(overrides) + [f"run_dir={run_dir}"]), run_dir)
        real = dcp_fs._write_item

        def write_item(*args, **kwargs):
            if trainer.step == fail_step and dist.get_rank() == fail_rank:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"__{fail_rank}_0.distcp")
            return real(*args, **kwargs)

        dcp_fs._write_item = write_item
        return trainer.run()
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"


def run(run_dir, overrides, fail_step=None):
    """Every rank's outcome: its exit code, or the CheckpointError it stopped on."""
    return run_distributed(_train_reporting, 2, EP2 + list(overrides) + ["cluster.gpus_per_node=2"],
                           str(run_dir), fail_step, timeout=90)


def test_a_damaged_latest_is_set_aside_and_the_ranks_resume_from_the_previous_one(run_dir):
    ckpts = run_dir / "checkpoints"
    good = tree(ckpts / "step_000002")
    flipped = flip_4k(ckpts / "step_000004")
    damaged = tree(ckpts / "step_000004")
    assert run(run_dir, ["train.steps=6", "checkpoint.interval=2"]) == [0, 0]
    assert sorted(read_metrics(run_dir)) == [3, 4, 5, 6]  # continued from step 2
    aside = [p for p in ckpts.iterdir() if p.name.startswith("step_000004.corrupt-")]
    assert len(aside) == 1 and tree(aside[0]) == damaged  # moved, never deleted
    assert tree(ckpts / "step_000002") == good
    assert (ckpts / "latest").read_text().strip() == "step_000006"
    for log in rank_logs(run_dir):  # every rank says which file and what became of it
        assert f"{flipped.name}: checksum differs" in log and aside[0].name in log


def test_no_checkpoint_verifies_every_rank_refuses_and_nothing_moves(run_dir):
    ckpts = run_dir / "checkpoints"
    flip_4k(ckpts / "step_000004")
    (ckpts / "step_000002" / "COMPLETE").unlink()
    before = tree(ckpts)
    outcomes = run(run_dir, ["train.steps=6", "checkpoint.interval=2"])
    assert len(set(outcomes)) == 1 and outcomes[0].startswith("ResumeRefused: refusing to start over")
    for expected in ("step_000004 (named in latest)", "checksum differs", "step_000002", "no COMPLETE marker",
                     "checkpoint.allow_fresh_start=true"):
        assert expected in outcomes[0]
    assert tree(ckpts) == before and not (run_dir / "metrics.jsonl").exists()


def test_a_fresh_start_with_the_flag_keeps_the_old_checkpoints_aside(run_dir):
    ckpts = run_dir / "checkpoints"
    flip_4k(ckpts / "step_000004")
    (ckpts / "step_000002" / "COMPLETE").unlink()
    before = {name: tree(ckpts / name) for name in ("step_000002", "step_000004")}
    assert run(run_dir, ["train.steps=2", "checkpoint.interval=2", "checkpoint.allow_fresh_start=true"]) == [0, 0]
    assert sorted(read_metrics(run_dir)) == [1, 2]
    aside = {p.name.split(".")[0]: p for p in ckpts.iterdir() if ".corrupt-" in p.name}
    assert {name: tree(p) for name, p in aside.items()} == before
    assert (ckpts / "latest").read_text().strip() == "step_000002"  # the new run's step 2
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("latest.superseded-")]


def test_latest_pointing_back_keeps_the_newer_checkpoint(run_dir):
    ckpts = run_dir / "checkpoints"
    newer = tree(ckpts / "step_000004")
    (ckpts / "latest").write_text("step_000002\n")
    assert run(run_dir, ["train.steps=6", "checkpoint.interval=2"]) == [0, 0]
    assert sorted(read_metrics(run_dir)) == [3, 4, 5, 6]
    aside = [p for p in ckpts.iterdir() if p.name.startswith("step_000004.superseded-")]
    assert len(aside) == 1 and tree(aside[0]) == newer
    assert {"step_000004", "step_000006"} <= {p.name for p in ckpts.iterdir()}


@pytest.mark.parametrize("policy,fail_step,ok", [("continue", 6, True), ("stop", 6, False), ("continue", 8, False)])
def test_a_full_disk_on_one_rank(run_dir, policy, fail_step, ok):
    """Saves at 6 and 8 after resuming at 4; the one at ``fail_step`` finds the
    disk full on rank 1. ``continue`` goes on unless it was the last save."""
    ckpts = run_dir / "checkpoints"
    previous = tree(ckpts / "step_000004")
    outcomes = run(run_dir, ["train.steps=8", "checkpoint.interval=2", f"checkpoint.on_save_error={policy}"],
                   fail_step=fail_step)
    assert not (ckpts / f"step_{fail_step:06d}.tmp").exists() and not (ckpts / f"step_{fail_step:06d}").exists()
    assert tree(ckpts / "step_000004") == previous
    if ok:
        assert outcomes == [0, 0]
        assert (ckpts / "latest").read_text().strip() == "step_000008"
        for log in rank_logs(run_dir):
            assert "checkpoint of step 6 not saved: no space left (rank 1" in log and "Training goes on" in log
        return
    assert len(set(outcomes)) == 1 and outcomes[0].startswith("CheckpointSaveError: checkpoint of step")
    assert "no space left (rank 1" in outcomes[0] and f"{ckpts} has " in outcomes[0] and "\n" not in outcomes[0]
    latest = "step_000004" if fail_step == 6 else "step_000006"
    assert (ckpts / "latest").read_text().strip() == latest and f"{latest} (named in latest) is intact" in outcomes[0]


def test_cli_refusal_is_one_message_and_a_non_zero_exit(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000002").mkdir(parents=True)
    (ckpts / "step_000002" / ".metadata").write_bytes(b"x")
    (ckpts / "latest").write_text("step_000002\n")
    cmd = [sys.executable, "-m", "mtrain.cli.train", "parallel=single", "cluster.gpus_per_node=1", *BASE,
           "train.steps=2", f"run_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "step_000002 (named in latest)" in out.stderr and "no COMPLETE marker" in out.stderr
    assert "checkpoint.allow_fresh_start=true" in out.stderr
    assert (ckpts / "step_000002" / ".metadata").read_bytes() == b"x"

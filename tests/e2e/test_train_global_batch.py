"""train.global_batch_size end to end on forked gloo ranks: a resume at dp=1 of
a run saved at dp=2 continues with the same global batches and data, and a
batch-size ramp over a data blend runs each step with its own micro-batch
count and resumes exactly. fp32 (train.dtype=auto on gloo)."""
import json
from pathlib import Path

import numpy as np
import pytest

from mtrain.config.loading import load_config
from mtrain.data import IndexedDatasetWriter
from mtrain.data.blend import BlendIndex
from mtrain.testing import run_distributed

BASE = [
    "data.seq_len=32", "train.lr=3e-3", "train.warmup_steps=1", "logging.wandb=false",
    "logging.progress=false", "train.collective_timeout_s=60", "checkpoint.interval=100",
    "parallel.num_microbatches=null",
]


def _run(overrides, run_dir):
    from mtrain.train.trainer import Trainer

    trainer = Trainer(load_config(BASE + list(overrides) + [f"run_dir={run_dir}"]), run_dir)
    counts, build = [], trainer._executor_for

    def recording(n):
        counts.append(n)
        return build(n)

    trainer._executor_for = recording  # the micro-batch count of every step, as train_step asks for it
    return trainer.run(), counts, sorted(trainer._executors)


def train(world, overrides, run_dir):
    results = run_distributed(_run, world, list(overrides) + [f"cluster.gpus_per_node={world}"], str(run_dir),
                              timeout=180)
    assert [code for code, _, _ in results] == [0] * world
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}, results[0][1], results[0][2]


ONE_STAGE = ["model.num_layers=4", "parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b", "train.global_batch_size=8",
             "train.steps=4"]


def test_resume_at_dp1_of_a_dp2_run_sees_the_same_batches(tmp_path):
    # dp=2 x 2 micro-batches of 2; resumed at dp=1 x 8 micro-batches of 1: the same 8 sequences a step.
    dp2 = ONE_STAGE + ["train.micro_batch_size=2"]
    straight, counts, _ = train(2, dp2, tmp_path / "a")
    assert counts == [2, 2, 2, 2]
    first, _, _ = train(2, dp2 + ["train.exit_interval=2"], tmp_path / "b")
    assert sorted(first) == [1, 2]
    resumed, counts, _ = train(1, ONE_STAGE + ["train.micro_batch_size=1"], tmp_path / "b")
    assert counts == [8, 8]
    assert sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[s]["consumed_samples"] for s in range(1, 5)] == [8, 16, 24, 32]
    assert [straight[s]["consumed_samples"] for s in range(1, 5)] == [8, 16, 24, 32]
    assert {resumed[s]["global_batch_size"] for s in range(1, 5)} == {8}
    for step in (3, 4):  # fp32 round-off: the micro-batches are summed in another order
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), step
        assert resumed[step]["grad_norm"] == pytest.approx(straight[step]["grad_norm"], rel=1e-4), step
    log = (tmp_path / "b" / "logs" / "rank0.log").read_text()
    assert "data position: 16 samples consumed; the next step's global batch is 8 sequences" in log


def write_source(prefix, low, high, seed):
    with IndexedDatasetWriter(prefix, 1024) as writer:
        for doc in np.random.default_rng(seed).integers(low, high, size=(40, 64)):
            writer.add_document(doc)
    return str(prefix)


def test_ramp_over_a_blend_runs_each_steps_micro_batches_and_resumes_exactly(tmp_path):
    blend = f"0.25 {write_source(tmp_path / 'code', 2, 500, 1)} 0.75 {write_source(tmp_path / 'web', 500, 1024, 2)}"
    # pp=2 1F1B, dp=1, micro-batches of 1: 2 -> 4 sequences by 1 over 6 samples (one level per 3 samples).
    # step:      1  2  3  4  5
    # consumed:  0  2  4  7  11  (before the step)
    # batch:     2  2  3  4  4
    ramp = ["model.num_layers=2", "parallel.pp=2", "parallel.ep=1", "parallel.schedule=1f1b", "train.micro_batch_size=1",
            "train.global_batch_size=4", "train.batch_ramp.start_size=2", "train.batch_ramp.increment=1",
            "train.batch_ramp.ramp_samples=6", "train.steps=5", f"data.blend={blend}"]
    straight, counts, built = train(2, ramp, tmp_path / "straight")
    assert counts == [2, 2, 3, 4, 4] and built == [2, 3, 4]
    assert [straight[s]["global_batch_size"] for s in range(1, 6)] == [2, 2, 3, 4, 4]
    assert [straight[s]["consumed_samples"] for s in range(1, 6)] == [2, 4, 7, 11, 15]
    index = BlendIndex([0.25, 0.75])
    for step in range(1, 6):
        drawn = straight[step]["blend_samples"]
        assert list(drawn) == ["code", "web"]
        assert list(drawn.values()) == index.counts(straight[step]["consumed_samples"])
    log = (tmp_path / "straight" / "logs" / "rank0.log").read_text()
    assert ("batch ramp: 2 -> 4 sequences by 1 over the first 6 samples (3 ramp steps take 7 samples; "
            "the full batch from step 4)") in log
    assert "data blend over 5 steps (15 samples)" in log and "code: weight 0.2500" in log

    # Stopped in the middle of the ramp and resumed: the same batches, bit for bit.
    train(2, ramp + ["train.exit_interval=3"], tmp_path / "resumed")
    resumed, counts, _ = train(2, ramp, tmp_path / "resumed")
    assert counts == [4, 4]
    for step in range(1, 6):
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["blend_samples"] == straight[step]["blend_samples"], step

    # The ramp's first steps are those of a run whose global batch is the ramp's start.
    fixed = [o for o in ramp if not o.startswith(("train.batch_ramp", "train.global_batch_size", "train.steps"))]
    small, counts, _ = train(2, fixed + ["train.global_batch_size=2", "train.steps=2"], tmp_path / "fixed")
    assert counts == [2, 2]
    assert [small[s]["loss"] for s in (1, 2)] == [straight[s]["loss"] for s in (1, 2)]

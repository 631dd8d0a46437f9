"""The trainer end to end on forked gloo ranks (and once through the CLI).

fp32 throughout (train.dtype=auto on gloo) unless a test says bf16. Exact resume is compared bit for bit; different layouts
agree to fp32 round-off (rtol 1e-5: summation order differs).
"""
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

BASE = [
    "model.num_layers=4", "train.micro_batch_size=1", "data.seq_len=32", "train.lr=3e-3",
    "train.warmup_steps=1", "logging.wandb=false", "logging.progress=false", "checkpoint.keep_last=3",
    "train.collective_timeout_s=60",
]


def _train(overrides, run_dir):
    from mtrain.train.trainer import Trainer

    cfg = load_config(BASE + list(overrides) + [f"run_dir={run_dir}"])
    return Trainer(cfg, run_dir).run()


def train(world, overrides, run_dir, timeout=240):
    overrides = list(overrides) + [f"cluster.gpus_per_node={world}"]
    codes = run_distributed(_train, world, overrides, str(run_dir), timeout=timeout)
    assert codes == [0] * world
    return read_metrics(run_dir)


def read_metrics(run_dir):
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


DUALPIPE_EP2 = ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipe", "parallel.num_microbatches=4"]


def test_exact_resume(tmp_path):
    straight = train(4, DUALPIPE_EP2 + ["train.steps=6", "checkpoint.interval=100"], tmp_path / "a")
    first = train(4, DUALPIPE_EP2 + ["train.steps=6", "train.exit_interval=3", "checkpoint.interval=100"], tmp_path / "b")
    assert max(first) == 3
    assert (tmp_path / "b" / "checkpoints" / "latest").exists()
    resumed = train(4, DUALPIPE_EP2 + ["train.steps=6", "checkpoint.interval=100"], tmp_path / "b")
    assert [first[s]["loss"] for s in (1, 2, 3)] == [straight[s]["loss"] for s in (1, 2, 3)]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["grad_norm"] == straight[step]["grad_norm"], step


LAYOUTS = {
    "pp1": (1, ["parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=4"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=4"]),
    "pp2_dualpipe": (2, ["parallel.pp=2", "parallel.ep=1", "parallel.schedule=dualpipe", "parallel.num_microbatches=4"]),
    "pp2_dualpipev": (2, ["parallel.pp=2", "parallel.ep=1", "parallel.schedule=dualpipev", "parallel.num_microbatches=4"]),
    "ep2": (2, ["parallel.pp=1", "parallel.ep=2", "parallel.schedule=1f1b", "parallel.num_microbatches=2"]),
    "ep2_no_zero": (2, ["parallel.pp=1", "parallel.ep=2", "parallel.schedule=1f1b", "parallel.num_microbatches=2",
                        "train.zero1=false"]),
    "tp2": (2, ["parallel.pp=1", "parallel.tp=2", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=4"]),
    "etp2": (2, ["parallel.pp=1", "parallel.tp=2", "parallel.ep=1", "parallel.expert_tp=2", "parallel.schedule=1f1b",
                 "parallel.num_microbatches=4"]),
}


def test_layouts_agree_on_the_first_steps(tmp_path):
    runs = {name: train(world, ov + ["train.steps=2"], tmp_path / name) for name, (world, ov) in LAYOUTS.items()}
    reference = runs.pop("pp1")
    for name, run in runs.items():
        for step in (1, 2):
            assert run[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), (name, step)
        assert run[1]["grad_norm"] == pytest.approx(reference[1]["grad_norm"], rel=1e-4), name


def test_reshard_resume_dualpipe_ep2_to_single(tmp_path):
    straight = train(4, DUALPIPE_EP2 + ["train.steps=4", "checkpoint.interval=100"], tmp_path / "a")
    train(4, DUALPIPE_EP2 + ["train.steps=4", "train.exit_interval=3", "checkpoint.interval=100"], tmp_path / "b")
    # One rank, same global batch: dp 2 x 4 micro-batches -> dp 1 x 8.
    single = ["parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=8"]
    resumed = train(1, single + ["train.steps=4", "checkpoint.interval=100"], tmp_path / "b")
    assert resumed[4]["loss"] == pytest.approx(straight[4]["loss"], rel=1e-5)


def test_reshard_resume_expert_tp2_to_single(tmp_path):
    world, etp2 = LAYOUTS["etp2"]
    straight = train(world, etp2 + ["train.steps=4", "checkpoint.interval=100"], tmp_path / "a")
    train(world, etp2 + ["train.steps=4", "train.exit_interval=3", "checkpoint.interval=100"], tmp_path / "b")
    # Experts saved split in width over expert_tp=2 load whole on one rank (dp is 1 in both).
    resumed = train(1, LAYOUTS["pp1"][1] + ["train.steps=4", "checkpoint.interval=100"], tmp_path / "b")
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # resumed at step 3, not restarted
    assert resumed[4]["loss"] == pytest.approx(straight[4]["loss"], rel=1e-5)


def test_auto_dtype_resumes_in_the_dtype_of_its_checkpoint(tmp_path):
    _, pp1 = LAYOUTS["pp1"]
    bf16 = pp1 + ["train.dtype=bf16", "train.steps=3", "checkpoint.interval=100"]
    train(1, bf16 + ["train.exit_interval=2"], tmp_path / "bf16")
    # auto on gloo is fp32, but a run trained in bf16 goes on in bf16 (its fp32 masters are in the checkpoint).
    resumed = train(1, pp1 + ["train.steps=3", "checkpoint.interval=100"], tmp_path / "bf16")
    straight = train(1, bf16, tmp_path / "straight")
    assert resumed[3]["loss"] == straight[3]["loss"]
    # An fp32 checkpoint has no masters to resume bf16 training from: refused, naming the fix.
    train(1, pp1 + ["train.steps=2", "train.exit_interval=1"], tmp_path / "fp32")
    with pytest.raises(RankFailure, match="trained in fp32.*train.dtype=fp32"):
        run_distributed(_train, 1, pp1 + ["train.dtype=bf16", "train.steps=2", "cluster.gpus_per_node=1"],
                        str(tmp_path / "fp32"), timeout=120)


def test_step_trace_written(tmp_path):
    world, overrides = LAYOUTS["pp2_dualpipe"]
    train(world, overrides + ["train.steps=2", "logging.trace_step=2"], tmp_path)
    trace = json.loads((tmp_path / "trace" / "step_000002.json").read_text())
    ops = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert {e["pid"] for e in ops} == {0, 1}
    assert all(e["dur"] >= 0 for e in ops)
    for rank in (0, 1):
        names = " ".join(e["name"] for e in ops if e["pid"] == rank)
        # Both chunks of the rank touch all 4 micro-batches (2 per direction),
        # and the MoE layers show their steps.
        assert all(f"m{m})" in names for m in range(4)), names
        assert "experts" in names and "attn" in names
    png = (tmp_path / "trace" / "step_000002.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bf16_with_async_checkpoints_trains_and_resumes(tmp_path):
    overrides = DUALPIPE_EP2 + ["train.dtype=bf16", "checkpoint.async_save=true", "checkpoint.interval=2",
                                "train.steps=6", "train.exit_interval=4"]
    first = train(4, overrides, tmp_path)
    assert sorted(first) == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip().endswith("step_000004")
    resumed = train(4, overrides, tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    losses = [resumed[s]["loss"] for s in range(1, 7)]
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    straight = train(4, overrides[:-1], tmp_path / "straight")
    # fp32 master weights and moments are checkpointed: bf16 resumes exactly too.
    assert [straight[s]["loss"] for s in (5, 6)] == [resumed[s]["loss"] for s in (5, 6)]

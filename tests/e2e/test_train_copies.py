"""Trainer invariants that only show after optimizer steps, on forked gloo ranks.

- DualPipe holds every stage twice (stage s, direction 0 on pipeline rank s;
  direction 1 on rank pp-1-s). Gradients are summed over the pair and the
  ZeRO-1 update is shared, so both copies must stay bit-identical (torch.equal).
- A step whose loss or gradient norm is not finite is skipped: reported with
  ``skipped`` and leaving every parameter and buffer untouched; more than
  ``train.max_bad_steps`` of them in a row abort the run.

The non-finite loss is injected with a forward hook that adds NaN to the
embedding output on one rank; it poisons that rank's micro-batches, and the
all-reduced norm and losses carry it to every rank.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from mtrain.config.loading import load_config
from mtrain.testing import run_distributed

BASE = [
    "model.num_layers=4", "train.micro_batch_size=1", "data.seq_len=16", "train.lr=3e-3",
    "train.warmup_steps=1", "logging.wandb=false", "logging.progress=false", "checkpoint.resume=none",
    "train.collective_timeout_s=50", "parallel.ep=1", "parallel.num_microbatches=4",
]


def make_trainer(world: int, overrides: list[str], run_dir: str):
    from mtrain.train.trainer import Trainer

    cfg = load_config(BASE + overrides + [f"cluster.gpus_per_node={world}", f"run_dir={run_dir}"])
    trainer = Trainer(cfg, run_dir)
    trainer.maybe_resume()
    return trainer


def chunk_state(trainer) -> dict:
    """(stage, direction) -> {name: tensor} of every parameter and buffer."""
    return {key: {n: t.detach().clone() for n, t in chunk.state_dict().items()}
            for key, chunk in trainer.chunks.items()}


def _train_and_report_chunks(world: int, overrides: list[str], run_dir: str, steps: int):
    trainer = make_trainer(world, overrides, run_dir)
    initial = chunk_state(trainer)
    for _ in range(steps):
        assert not trainer.train_step()["skipped"]
    return trainer.pp_rank, initial, chunk_state(trainer)


@pytest.mark.parametrize("pp", [2, 4])
def test_dualpipe_copies_stay_bit_identical(tmp_path, pp):
    overrides = [f"parallel.pp={pp}", "parallel.schedule=dualpipe", f"parallel.num_microbatches={2 * pp}"]
    results = run_distributed(_train_and_report_chunks, pp, pp, overrides, str(tmp_path), 3, timeout=60)
    by_pp_rank = {pp_rank: (initial, final) for pp_rank, initial, final in results}
    for stage in range(pp):
        initial, forward_copy = by_pp_rank[stage][0][(stage, 0)], by_pp_rank[stage][1][(stage, 0)]
        reverse_copy = by_pp_rank[pp - 1 - stage][1][(stage, 1)]
        assert forward_copy.keys() == reverse_copy.keys()
        for name, tensor in forward_copy.items():
            assert torch.equal(tensor, reverse_copy[name]), (stage, name)
        # The copies did train: equal because they moved together, not because they stood still.
        assert any(not torch.equal(initial[n], forward_copy[n]) for n in forward_copy if n.endswith("weight")), stage


def _poison_embedding(trainer):
    """A forward hook making this rank's embedding output NaN; returns its handle."""
    first = next(chunk for chunk in trainer.chunks.values() if chunk.is_first)
    return first.embed.register_forward_hook(lambda module, args, out: out + float("nan"))


def _skip_then_recover(world: int, overrides: list[str], run_dir: str):
    trainer = make_trainer(world, overrides, run_dir)
    first = trainer.train_step()
    before = chunk_state(trainer)
    optimizer_steps = trainer.optimizer.step_count
    handle = _poison_embedding(trainer) if dist.get_rank() == 0 else None
    bad = trainer.train_step()
    if handle is not None:
        handle.remove()
    after_bad = chunk_state(trainer)
    loads_cleared = all(float(moe.router.load.abs().sum()) == 0 for _, moe in trainer.moe_layers())
    unchanged = all(torch.equal(before[k][n], after_bad[k][n]) for k in before for n in before[k])
    recovered = trainer.train_step()
    moved = any(not torch.equal(after_bad[k][n], t) for k, s in chunk_state(trainer).items() for n, t in s.items())
    return {
        "skipped": [first["skipped"], bad["skipped"], recovered["skipped"]],
        "bad_loss": bad["loss"], "unchanged": unchanged, "moved_after": moved, "loads_cleared": loads_cleared,
        "optimizer_steps_during_bad": trainer.optimizer.step_count - optimizer_steps - 1,
        "bad_steps_after_recovery": trainer.bad_steps,
    }


def test_non_finite_step_is_skipped_and_changes_nothing(tmp_path):
    overrides = ["parallel.pp=2", "parallel.schedule=dualpipe"]
    results = run_distributed(_skip_then_recover, 2, 2, overrides, str(tmp_path), timeout=60)
    for rank, r in enumerate(results):
        assert r["skipped"] == [False, True, False], rank
        assert math.isnan(r["bad_loss"]), rank  # the poisoned loss reaches every rank
        assert r["unchanged"], rank
        assert r["loads_cleared"], rank  # the bad step's routing does not steer the next bias update
        assert r["moved_after"], rank
        assert r["optimizer_steps_during_bad"] == 0, rank
        assert r["bad_steps_after_recovery"] == 0, rank


def _bad_steps_until_abort(world: int, overrides: list[str], run_dir: str):
    from mtrain.train.trainer import TrainingAborted

    trainer = make_trainer(world, overrides, run_dir)
    if dist.get_rank() == 0:
        _poison_embedding(trainer)
    skipped = []
    try:
        for _ in range(3):
            skipped.append(trainer.train_step()["skipped"])
    except TrainingAborted as e:
        return {"skipped": skipped, "aborted_at": trainer.bad_steps, "message": str(e)}
    return {"skipped": skipped, "aborted_at": None, "message": ""}


def test_consecutive_bad_steps_abort(tmp_path):
    overrides = ["parallel.pp=2", "parallel.schedule=1f1b", "train.max_bad_steps=1"]
    results = run_distributed(_bad_steps_until_abort, 2, 2, overrides, str(tmp_path), timeout=60)
    for rank, r in enumerate(results):
        # One bad step is tolerated (skipped); the second in a row aborts on every rank.
        assert r["skipped"] == [True], rank
        assert r["aborted_at"] == 2, rank
        assert "train.max_bad_steps=1" in r["message"], rank

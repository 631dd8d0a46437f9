"""The pipeline executor against a single-process reference.

Model: ``ToyChunk`` stages (embedding | tanh(linear) | exchange | tanh(linear) |
exchange | linear + residual | cross-entropy), ``num_model_stages`` of them.

* pp=2: two pipelines side by side (world 4). Pipeline rank ``r`` of both
  pipelines forms a 2-rank "ep" group, and every exchange is a real
  ``AllToAllOp`` over it: each rank keeps half its micro-batch rows and swaps
  the other half with its mirror, as expert-parallel data-parallel replicas do.
  Mirror ranks run the same instruction list, so their all-to-alls line up.
  The reference runs both pipelines' programs in lockstep in one process and
  swaps the rows itself.
* pp=4: one pipeline (world 4), exchanges are ``IdentityOp``.

Checked for every schedule: per-micro-batch losses and every parameter
gradient (DualPipe: the sum of a stage's two copies) against the reference
(fp32, rtol 1e-5 / atol 1e-6; the summation order differs), overlap on vs off
bit-identical, and, from the recorded events, that inside every overlapped
pair one side computes while the other side's exchange is in flight.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtrain.pipeline.executor import PipelineExecutor, expected_chunk_keys
from mtrain.pipeline.instructions import Op, Overlap
from mtrain.pipeline.p2p import message_tag
from mtrain.pipeline.schedule_rules import num_model_stages, placement
from mtrain.runtime.comm import AllToAllOp, IdentityOp
from mtrain.runtime.context import StepContext
from mtrain.runtime.program import Compute
from mtrain.testing import run_distributed
from mtrain.testing.toy import ToyChunk

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
HIDDEN, VOCAB, SEQ, MBS = 8, 11, 3, 2
RTOL, ATOL = 1e-5, 1e-6


def make_batches(pipeline: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + pipeline)
    return [{"input_ids": torch.randint(VOCAB, (MBS, SEQ), generator=g),
             "labels": torch.randint(VOCAB, (MBS, SEQ), generator=g)} for _ in range(n)]


def make_chunk(stage: int, num_stages: int, comm_op=IdentityOp) -> ToyChunk:
    return ToyChunk(stage, num_stages, HIDDEN, VOCAB, seed=7, comm_op=comm_op)


def _grads(chunk: ToyChunk) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in chunk.named_parameters()}


def _worker(schedule: str, pp: int, n: int, pipelines: int) -> dict:
    rank = dist.get_rank()
    pipeline, pp_rank = divmod(rank, pp)
    comm_op = IdentityOp
    if pipelines == 2:
        ep_groups = [dist.new_group([r, pp + r]) for r in range(pp)]  # every rank creates every group
        half = MBS // 2
        group = ep_groups[pp_rank]
        comm_op = lambda: AllToAllOp([half, half], [half, half], group)  # noqa: E731
    batches = make_batches(pipeline, n)
    num_stages = num_model_stages(schedule, pp)
    out = {"pipeline": pipeline}
    for overlap in (True, False):
        chunks = {key: make_chunk(key[0], num_stages, comm_op) for key in expected_chunk_keys(schedule, pp, pp_rank)}
        executor = PipelineExecutor(schedule, pp, pp_rank, n, chunks,
                                    [pipeline * pp + i for i in range(pp)], overlap=overlap, trace=True)
        result = executor.step(batches)
        pairs = [op.events for op in result.trace.ops if isinstance(op.instruction, Overlap)]
        out[overlap] = {"losses": result.losses, "metrics": result.metrics,
                        "grads": {key: _grads(c) for key, c in chunks.items()}, "pairs": pairs}
    return out


def reference(schedule: str, pp: int, n: int, pipelines: int):
    """Losses [pipeline][mb] and gradients [pipeline][stage] of the full model,
    the pipelines' programs run in lockstep, exchanges done here."""
    num_stages = num_model_stages(schedule, pp)
    models = [[make_chunk(s, num_stages) for s in range(num_stages)] for _ in range(pipelines)]
    data = [make_batches(p, n) for p in range(pipelines)]
    rows = MBS // pipelines
    losses = [[0.0] * n for _ in range(pipelines)]
    for m in range(n):
        hidden = [None] * pipelines
        for s in range(num_stages):
            chunks = [models[p][s] for p in range(pipelines)]
            carries = [c.initial_carry(data[p][m], hidden[p]) for p, c in enumerate(chunks)]
            step = StepContext()
            for steps in zip(*(c.program().steps for c in chunks)):
                if isinstance(steps[0], Compute):
                    carries = [s.fn(carry, step) for s, carry in zip(steps, carries)]
                    continue
                name = steps[0].field
                xs = [getattr(carry, name) for carry in carries]  # pipeline p receives rows p*rows.. of every pipeline
                carries = [carry.replace(**{name: torch.cat([x[p * rows:(p + 1) * rows] for x in xs])})
                           for p, carry in enumerate(carries)]
            hidden = [carry.hidden for carry in carries]
        total = sum(carry.loss for carry in carries) / n
        total.backward()
        for p, carry in enumerate(carries):
            losses[p][m] = float(carry.loss.detach())
    grads = [[_grads(c) for c in chunks] for chunks in models]
    return losses, grads


def _check(schedule: str, pp: int, n: int, pipelines: int):
    results = run_distributed(_worker, pipelines * pp, schedule, pp, n, pipelines, timeout=60)
    ref_losses, ref_grads = reference(schedule, pp, n, pipelines)
    for overlap in (True, False):
        for p in range(pipelines):
            mine = [r for r in results if r["pipeline"] == p]
            losses = {}
            for r in mine:
                assert not set(losses) & set(r[overlap]["losses"]), "a micro-batch's loss reported twice"
                losses.update(r[overlap]["losses"])
            assert sorted(losses) == list(range(n))
            torch.testing.assert_close(torch.tensor([losses[m] for m in range(n)]),
                                       torch.tensor(ref_losses[p]), rtol=RTOL, atol=ATOL)
            for r in mine:
                for m, metrics in r[overlap]["metrics"].items():
                    assert metrics["lm_loss"] == losses[m]
            for s, ref in enumerate(ref_grads[p]):
                copies = [r[overlap]["grads"][key] for r in mine for key in r[overlap]["grads"] if key[0] == s]
                assert len(copies) == placement(schedule, pp, 0, mtp=False).copies_per_stage
                for name, g in ref.items():
                    got = sum(c[name] for c in copies)
                    torch.testing.assert_close(got, g, rtol=RTOL, atol=ATOL, msg=lambda m: f"stage {s} {name}: {m}")
    for r in results:  # overlap on vs off: same math, same order -> bit-identical
        on, off = r[True], r[False]
        assert on["losses"] == off["losses"]
        for key in on["grads"]:
            for name in on["grads"][key]:
                assert torch.equal(on["grads"][key][name], off["grads"][key][name]), (key, name)
    return results


def _computes_during_exchange(events, busy_side: str) -> bool:
    """Some compute of ``busy_side`` starts while the other side's exchange is
    started and not yet waited on."""
    other = "B" if busy_side == "F" else "F"
    starts = [t for t, side, kind, _ in events if side == other and kind == "comm_start"]
    waits = [t for t, side, kind, _ in events if side == other and kind == "comm_wait"]
    computes = [t for t, side, kind, _ in events if side == busy_side and kind == "compute_start"]
    return any(t0 < t < t1 for t0, t1 in zip(starts, waits) for t in computes)


def _check_overlap_events(results, schedule: str):
    pairs_on = [events for r in results for events in r[True]["pairs"]]
    pairs_off = [events for r in results for events in r[False]["pairs"]]
    if schedule not in ("dualpipe", "dualpipev"):
        assert not pairs_on
        return
    assert pairs_on and len(pairs_on) == len(pairs_off)
    for events in pairs_on:
        assert _computes_during_exchange(events, "B") and _computes_during_exchange(events, "F")
    for events in pairs_off:  # sequential: nothing runs during an exchange
        assert not _computes_during_exchange(events, "B") and not _computes_during_exchange(events, "F")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_two_pipelines_alltoall_matches_reference(schedule):
    results = _check(schedule, pp=2, n=4, pipelines=2)
    _check_overlap_events(results, schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp4_matches_reference(schedule):
    results = _check(schedule, pp=4, n=8, pipelines=1)
    _check_overlap_events(results, schedule)


def test_message_tags_are_distinct():
    stages, n = 8, 6
    keys = [(k, s, m, d) for k in "FB" for s in range(stages) for m in range(n) for d in (0, 1)]
    tags = {message_tag(key, stages, n) for key in keys}
    assert len(tags) == len(keys) and min(tags) >= 0
    with pytest.raises(ValueError):
        message_tag(("F", stages, 0, 0), stages, n)


def test_wrong_chunks_are_rejected():
    chunks = {(0, 0): make_chunk(0, 4)}
    with pytest.raises(ValueError, match=r"dualpipe pipeline rank 0 holds chunks \[\(0, 0\), \(3, 1\)\]"):
        PipelineExecutor("dualpipe", 4, 0, 8, chunks, [0, 1, 2, 3])


def _gather_worker():
    from mtrain.pipeline.trace import OpRecord, RankTrace, gather_traces

    rank = dist.get_rank()
    op = OpRecord(Op("F", rank, 0), 1.0 + rank, 2.0 + rank, 3.0 + rank)
    return gather_traces(RankTrace(rank, rank, 1.0, 4.0 + rank, [op]), dst=0)


def test_gather_traces_collects_every_rank_on_dst():
    gathered = run_distributed(_gather_worker, 3, timeout=30)
    assert gathered[1] is None and gathered[2] is None
    assert [(t.rank, t.ops[0].instruction, t.step_end) for t in gathered[0]] == [
        (r, Op("F", r, 0), 4.0 + r) for r in range(3)]

"""``PipelineExecutor.forward_only`` (evaluation) on forked gloo ranks against
the same toy model run plainly in one process.

For every schedule, pp=2 and pp=4, all or one of the micro-batches: the last
stages' losses equal the single-process forward bit for bit (the same ops on
the same shapes, hidden states sent exactly), and nothing of training is
touched: no gradient, nothing recorded for a backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtrain.pipeline.executor import PipelineExecutor, expected_chunk_keys
from mtrain.pipeline.schedule_rules import num_model_stages
from mtrain.runtime.context import StepContext
from mtrain.runtime.program import run_plain
from mtrain.testing import run_distributed
from mtrain.testing.toy import ToyChunk

HIDDEN, VOCAB, SEQ, MBS = 8, 11, 3, 2


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(VOCAB, (MBS, SEQ), generator=g),
             "labels": torch.randint(VOCAB, (MBS, SEQ), generator=g)} for _ in range(n)]


def _chunk(stage: int, num_stages: int) -> ToyChunk:
    return ToyChunk(stage, num_stages, HIDDEN, VOCAB, seed=3)


def _worker(schedule: str, pp: int, n: int, used: int) -> dict:
    rank = dist.get_rank()
    stages = num_model_stages(schedule, pp)
    chunks = {key: _chunk(key[0], stages) for key in expected_chunk_keys(schedule, pp, rank)}
    executor = PipelineExecutor(schedule, pp, rank, n, chunks, list(range(pp)))
    batches = _batches(n)[:used]
    first = executor.forward_only(batches)
    again = executor.forward_only(batches)  # a second pass on the same executor (channels reused)
    untouched = all(p.grad is None for c in chunks.values() for p in c.parameters())
    nothing_kept = all(not runner.saved for runner in executor.runners.values())
    return {"losses": {mb: c.loss for mb, c in first.outputs.items()},
            "again": {mb: c.loss for mb, c in again.outputs.items()},
            "untouched": untouched, "nothing_kept": nothing_kept,
            "grad_free": all(not c.loss.requires_grad for c in first.outputs.values())}


def reference(schedule: str, pp: int, n: int) -> list[torch.Tensor]:
    stages = num_model_stages(schedule, pp)
    model = [_chunk(s, stages) for s in range(stages)]
    losses = []
    with torch.no_grad():
        for batch in _batches(n):
            hidden = None
            for chunk in model:
                final = run_plain(chunk.program().steps, chunk.initial_carry(batch, hidden), StepContext())
                hidden = final.hidden
            losses.append(final.loss)
    return losses


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4])
def test_forward_only_matches_single_process(schedule, pp):
    n = 2 * pp
    expected = reference(schedule, pp, n)
    for used in (n, 1):
        results = run_distributed(_worker, pp, schedule, pp, n, used, timeout=60)
        losses = {}
        for r in results:
            assert r["untouched"] and r["nothing_kept"] and r["grad_free"]
            assert r["again"].keys() == r["losses"].keys()
            for mb, loss in r["losses"].items():
                assert torch.equal(loss, r["again"][mb])
                assert mb not in losses, f"micro-batch {mb} finished on two ranks"
                losses[mb] = loss
        assert sorted(losses) == list(range(used))
        for mb in range(used):
            assert torch.equal(losses[mb], expected[mb]), (schedule, pp, used, mb)

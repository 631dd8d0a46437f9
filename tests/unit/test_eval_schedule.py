"""The forward-only instruction lists evaluation runs (``schedules.forward_only``):
every micro-batch through every stage exactly once, on the rank holding the
stage for its direction, in an order no rank can deadlock."""
from __future__ import annotations

import pytest

from mtrain.pipeline.instructions import dependencies, done_key
from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES, microbatches_of_direction, num_model_stages, stage_rank
from mtrain.pipeline.schedules import forward_only

CASES = [(s, pp, n) for s in SCHEDULE_NAMES for pp in (1, 2, 4) for n in (1, 3, 8)
         if not (s == "dualpipe" and pp % 2)]


def _run_in_lockstep(schedule: str, pp: int, per_rank: list) -> list:
    """Execute the lists with only the data dependencies; the order of completion."""
    done, order, heads = set(), [], [0] * pp
    while any(heads[r] < len(per_rank[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            if heads[r] < len(per_rank[r]):
                op = per_rank[r][heads[r]]
                if all(d in done for d in dependencies(schedule, pp, op)):
                    done.add(done_key(op))
                    order.append(op)
                    heads[r] += 1
                    moved = True
        assert moved, f"deadlock: heads {[per_rank[r][heads[r]] for r in range(pp) if heads[r] < len(per_rank[r])]}"
    return order


@pytest.mark.parametrize("schedule,pp,n", CASES)
def test_every_forward_once_on_its_rank_without_deadlock(schedule, pp, n):
    per_rank = [forward_only(schedule, pp, n, r) for r in range(pp)]
    stages = num_model_stages(schedule, pp)
    expected = {(s, m, d) for d in (0, 1) for m in microbatches_of_direction(schedule, n, d) for s in range(stages)}
    seen = [(op.stage, op.microbatch, op.direction) for ops in per_rank for op in ops]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    assert {m for _, m, _ in seen} == set(range(n))
    for r, ops in enumerate(per_rank):
        assert all(op.kind == "F" and stage_rank(schedule, pp, op.stage, op.direction) == r for op in ops)
        # Within a stage link (channel) the forwards run in micro-batch order.
        for key in {(op.stage, op.direction) for op in ops}:
            mbs = [op.microbatch for op in ops if (op.stage, op.direction) == key]
            assert mbs == sorted(mbs)
    assert len(_run_in_lockstep(schedule, pp, per_rank)) == len(seen)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        forward_only("1f1b", 2, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        forward_only("1f1b", 2, 4, 2)
    with pytest.raises(ValueError, match="not a known schedule"):
        forward_only("gpipe", 2, 4, 0)

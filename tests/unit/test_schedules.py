"""Schedule builders, instruction helpers and the validator."""
from __future__ import annotations

import types

import pytest

from mtrain.pipeline.instructions import (
    Op,
    Overlap,
    backward_dest_rank,
    forward_dest_rank,
    forward_source_rank,
    instruction_from_json,
    next_stage,
    prev_stage,
    schedule_to_json,
)
from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES, schedule_errors, stage_rank, stages_of_rank
from mtrain.pipeline.schedules import SCHEDULES, build_all_ranks, build_schedule, dualpipe, one_f_one_b, zb1p
from mtrain.pipeline.validate import ScheduleError, validate_schedule

GRID = [(pp, n) for pp in (1, 2, 3, 4, 6, 8) for n in (1, 2, 3, 5, 8, 12, 16, 17, 20, 24)]


def _valid_args():
    for name in SCHEDULE_NAMES:
        for pp, n in GRID:
            if not schedule_errors(name, pp, n):
                yield name, pp, n


def test_registry_matches_rules():
    assert tuple(SCHEDULES) == SCHEDULE_NAMES


@pytest.mark.parametrize("name,pp,n", list(_valid_args()))
def test_validator_accepts_every_schedule(name, pp, n):
    per_rank = build_all_ranks(name, pp, n)
    assert validate_schedule(name, pp, n, per_rank) == []
    # each rank only touches the stages the layout gives it
    for rank, ops in enumerate(per_rank):
        held = set(stages_of_rank(name, pp, rank))
        assert {op.stage for ins in ops for op in ins.ops} <= held


def test_every_schedule_covered_by_grid():
    assert {name for name, _, _ in _valid_args()} == set(SCHEDULE_NAMES)


@pytest.mark.parametrize("name,pp,n", [("dualpipe", 3, 8), ("dualpipe", 4, 7), ("dualpipe", 4, 6),
                                       ("dualpipev", 4, 7), ("nope", 2, 4)])
def test_build_schedule_rejects_bad_arguments(name, pp, n):
    with pytest.raises(ValueError) as err:
        build_schedule(name, pp, n, 0)
    for msg in schedule_errors(name, pp, n):
        assert msg in str(err.value)


def test_1f1b_shape():
    assert one_f_one_b(4, 6, 1) == [
        Op("F", 1, 0), Op("F", 1, 1), Op("F", 1, 2), Op("B", 1, 0), Op("F", 1, 3), Op("B", 1, 1),
        Op("F", 1, 4), Op("B", 1, 2), Op("F", 1, 5), Op("B", 1, 3), Op("B", 1, 4), Op("B", 1, 5),
    ]
    last = one_f_one_b(4, 3, 3)
    assert [o.kind for o in last] == ["F", "B"] * 3


def test_zb1p_splits_backward_and_defers_weights():
    for rank in range(4):
        ops = zb1p(4, 8, rank)
        kinds = [o.kind for o in ops]
        assert "B" not in kinds and kinds.count("I") == 8 and kinds.count("W") == 8
        # rank r holds back its first r weight gradients: r more I's than W's
        # are done before the first W
        first_w = kinds.index("W")
        assert kinds[:first_w].count("I") == rank + 1
        # warm-up is 1F1B's
        assert kinds[: 4 - rank] == ["F"] * (4 - rank)


def _phase_kinds(ops):
    return ["FB" if isinstance(i, Overlap) else i.kind for i in ops]


def test_dualpipe_phases_rank0_pp4():
    # pp=4 (H=2), rank 0 (h=0), N=8: phase by phase as DualPipe defines them
    ops = dualpipe(4, 8, 0)
    d0 = lambda k, m: Op(k, 0, m, 0)  # noqa: E731  stage 0 of direction 0
    d1 = lambda k, m: Op(k, 3, m, 1)  # noqa: E731  stage 3 of direction 1
    expected = [
        d0("F", 0), d0("F", 1),                          # 1: 2(H-h-1) = 2 F of chunk 0
        d0("F", 2), d1("F", 4),                          # 2: h+1 = 1 pair
        d1("I", 4), d1("W", 4), d1("F", 5),              # 3: H-h-1 = 1 of [I, W, F]
        Overlap(d0("F", 3), d1("B", 5)), Overlap(d1("F", 6), d0("B", 0)),   # 4: N/2-PP+h+1 = 1
        d1("B", 6), Overlap(d1("F", 7), d0("B", 1)),     # 5: H-h-1 = 1 of [B, F&B]
        d1("B", 7), d0("I", 2),                          # 6: h+1 = 1 pair, second half I
        d0("W", 2), d0("I", 3),                          # 7: H-h-1 = 1 of [W, I]
        d0("W", 3),                                      # 8: h+1 = 1 W
    ]
    assert ops == expected


def test_dualpipe_middle_rank_does_not_overlap_first_pair():
    pp, n = 8, 20
    for rank in range(pp):
        ops = dualpipe(pp, n, rank)
        kinds = _phase_kinds(ops)
        first_fb = kinds.index("FB")
        middle = rank in (pp // 2 - 1, pp // 2)
        if middle:
            # ... F0, B1 (not overlapped), then F&B
            assert kinds[first_fb - 2:first_fb + 1] == ["F", "B", "FB"]
        else:
            assert kinds[first_fb - 1] == "F"
        # the second half of the ranks starts with direction 1
        first = ops[0]
        assert first.direction == (1 if rank >= pp // 2 else 0)
        h = min(rank, pp - 1 - rank)
        assert kinds[: 2 * (pp // 2 - h - 1)] == ["F"] * (2 * (pp // 2 - h - 1))
        pairs = kinds.count("FB")
        assert pairs == 2 * (n // 2 - pp + h + 1) - int(middle) + (pp // 2 - h - 1)


def test_dualpipe_directions_and_microbatches():
    pp, n = 4, 12
    for rank in range(pp):
        for ins in dualpipe(pp, n, rank):
            for op in ins.ops:
                assert stage_rank("dualpipe", pp, op.stage, op.direction) == rank
                assert (op.microbatch < n // 2) == (op.direction == 0)


def test_placement_helpers():
    assert [stage_rank("dualpipe", 8, s, 1) for s in range(8)] == list(range(7, -1, -1))
    assert [stage_rank("dualpipev", 4, s) for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert forward_source_rank("dualpipev", 4, 0) is None
    assert forward_dest_rank("dualpipev", 4, 3) == 3  # the two middle stages share the last rank
    assert forward_dest_rank("dualpipev", 4, 7) is None
    assert forward_source_rank("dualpipe", 4, 2, 1) == 2  # stage 1 of direction 1 is on rank 2
    assert backward_dest_rank("dualpipe", 4, 2, 1) == 2
    assert prev_stage("1f1b", 4, 0) is None and next_stage("1f1b", 4, 3) is None
    with pytest.raises(ValueError):
        stage_rank("1f1b", 4, 0, 1)
    with pytest.raises(ValueError):
        stage_rank("dualpipev", 4, 8)


def test_json_round_trip():
    ins = [Op("F", 1, 2), Overlap(Op("F", 0, 3, 1), Op("B", 3, 1, 0))]
    js = schedule_to_json("dualpipe", [ins])[0]
    assert js[0] == {"kind": "F", "stage": 1, "microbatch": 2, "direction": 0}
    assert js[1] == {"kind": "overlap", "forward": {"kind": "F", "stage": 0, "microbatch": 3, "direction": 1},
                     "backward": {"kind": "B", "stage": 3, "microbatch": 1, "direction": 0}}
    assert [instruction_from_json(x) for x in js] == ins
    assert schedule_to_json("1f1b", [[Op("W", 0, 1)]]) == [[{"kind": "W", "stage": 0, "microbatch": 1}]]
    with pytest.raises(ValueError):
        Op("X", 0, 0)
    with pytest.raises(ValueError):
        Overlap(Op("B", 0, 0), Op("B", 0, 1))


# ---------------------------------------------------------------- broken ones

def test_validator_rejects_missing_backward():
    ops = build_all_ranks("1f1b", 4, 8)
    ops[1] = [o for o in ops[1] if o != Op("B", 1, 3)]
    problems = validate_schedule("1f1b", 4, 8, ops)
    assert any("(s1,m3)" in p and "no backward" in p for p in problems), problems


def test_validator_rejects_missing_forward_and_duplicates():
    ops = build_all_ranks("1f1b", 2, 4)
    ops[0] = [o for o in ops[0] if o != Op("F", 0, 2)] + [Op("B", 0, 1)]
    problems = validate_schedule("1f1b", 2, 4, ops)
    assert any("(s0,m2)" in p and "missing forward" in p for p in problems), problems
    assert any("(s0,m1)" in p and "2 B" in p for p in problems), problems


def test_validator_rejects_w_before_its_i():
    ops = build_all_ranks("zb1p", 4, 8)
    r = ops[2]
    i, w = r.index(Op("I", 2, 1)), r.index(Op("W", 2, 1))
    r[i], r[w] = r[w], r[i]
    problems = validate_schedule("zb1p", 4, 8, ops)
    assert any("W(s2,m1)" in p and "precedes its I" in p for p in problems), problems


def test_validator_rejects_i_without_w():
    ops = build_all_ranks("zb1p", 2, 4)
    ops[0] = [o for o in ops[0] if o != Op("W", 0, 3)]
    problems = validate_schedule("zb1p", 2, 4, ops)
    assert any("(s0,m3)" in p and "no W" in p for p in problems), problems


def test_validator_rejects_wrong_rank_and_microbatch():
    ops = build_all_ranks("dualpipe", 4, 8)
    ops[0] = [Op("F", 1, 0, 0)] + ops[0][1:]
    ops[1] = [Op("F", 1, 5, 0)] + ops[1][1:]  # micro-batch 5 is direction 1
    problems = validate_schedule("dualpipe", 4, 8, ops)
    assert any("rank 0" in p and "belongs on rank 1" in p for p in problems), problems
    assert any("micro-batch 5" in p and "direction 0" in p for p in problems), problems


def test_validator_reports_cyclic_wait():
    # rank 0 waits for the gradient of m0 before sending F(s0,m1); rank 1
    # wants F(s0,m1) before it runs the backward of m0
    ops = [
        [Op("F", 0, 0), Op("B", 0, 0), Op("F", 0, 1), Op("B", 0, 1)],
        [Op("F", 1, 0), Op("F", 1, 1), Op("B", 1, 0), Op("B", 1, 1)],
    ]
    problems = validate_schedule("1f1b", 2, 2, ops)
    assert len(problems) == 1, problems
    msg = problems[0]
    assert "cyclic wait" in msg
    assert "rank 0 at B(s0,m0) waits for B/I(s1,m0) from rank 1" in msg
    assert "rank 1 at F(s1,m1) waits for F(s0,m1) from rank 0" in msg
    with pytest.raises(ScheduleError) as err:
        validate_schedule("1f1b", 2, 2, ops, strict=True)
    assert err.value.problems == problems


def test_validator_reports_backward_before_its_forward():
    ops = build_all_ranks("1f1b", 2, 2)
    ops[0] = [Op("F", 0, 0), Op("B", 0, 1), Op("F", 0, 1), Op("B", 0, 0)]
    problems = validate_schedule("1f1b", 2, 2, ops)
    assert any("rank 0 at B(s0,m1) waits for F(s0,m1)" in p for p in problems), problems


def test_validator_reports_cycle_in_dualpipe_overlap():
    # pairing a forward with the backward of the same micro-batch can never run
    ops = build_all_ranks("dualpipe", 4, 8)
    r3 = ops[3]
    idx = next(i for i, x in enumerate(r3) if isinstance(x, Overlap))
    pair = r3[idx]
    r3[idx] = Overlap(pair.forward, Op("B", pair.forward.stage, pair.forward.microbatch, pair.forward.direction))
    problems = validate_schedule("dualpipe", 4, 8, ops)
    assert any("deadlock" in p for p in problems), problems


# ------------------------------------------------- torch ScheduleDualPipeV

def _torch_dualpipev_order(pp: int, n: int) -> list[list]:
    """Per rank, the compute actions torch's ScheduleDualPipeV computes. Its
    order is produced by ``_calculate_single_rank_operations``, which only
    reads the group size and the micro-batch count, so it is called on a
    stand-in for the schedule object instead of building real stages."""
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV

    stand_in = types.SimpleNamespace(pp_group_size=pp, _n_microbatches=n)
    return [ScheduleDualPipeV._calculate_single_rank_operations(stand_in, r) for r in range(pp)]


def _from_torch(action):
    kind = action.computation_type.value
    if kind == "OVERLAP_F_B":
        fwd, bwd = action.sub_actions
        return Overlap(_from_torch(fwd), _from_torch(bwd))
    assert kind in ("F", "B", "I", "W"), kind
    return Op(kind, action.stage_index, action.microbatch_index)


@pytest.mark.parametrize("pp,n", [(1, 2), (2, 4), (2, 7), (3, 6), (4, 8), (4, 11), (5, 13), (8, 16), (8, 20)])
def test_dualpipev_matches_torch(pp, n):
    torch_order = _torch_dualpipev_order(pp, n)
    for rank in range(pp):
        theirs = [_from_torch(a) for a in torch_order[rank] if a is not None]
        ours = build_schedule("dualpipev", pp, n, rank)
        # documented in docs/schedules.md: the compute order is identical
        assert ours == theirs, f"rank {rank} differs"

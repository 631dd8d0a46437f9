"""The timeline simulator and the renderer."""
from __future__ import annotations

import pytest

from mtrain.pipeline.instructions import Op
from mtrain.pipeline.simulate import normalize_costs, simulate, simulate_ops
from mtrain.pipeline.validate import ScheduleError

PUBLISHED = {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 2.5}
COST_SETS = [
    {"F": 1, "B": 2, "W": 1, "FB": 2.5},
    {"F": 1, "B": 1, "W": 0.5, "FB": 2},
    {"F": 2, "B": 3, "W": 1, "FB": 4},
    {"F": 1.5, "B": 3.5, "W": 1.25, "FB": 4.5},
]


@pytest.mark.parametrize("costs", COST_SETS)
@pytest.mark.parametrize("pp,n", [(1, 3), (2, 2), (3, 7), (4, 4), (4, 9), (8, 20), (8, 3)])
def test_1f1b_idle_is_pp_minus_1_times_f_plus_b(costs, pp, n):
    r = simulate("1f1b", pp, n, costs)
    # also when n < pp: every rank then waits for the others' share of the chain
    expected = (pp - 1) * (costs["F"] + costs["B"])
    for rank in r.ranks:
        assert rank.idle == pytest.approx(expected), (rank.rank, rank.idle)
        assert rank.busy == pytest.approx(n * (costs["F"] + costs["B"]))


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_published_bubbles(pp):
    c = PUBLISHED
    zb = simulate("zb1p", pp, 3 * pp, c)
    assert zb.bubble == pytest.approx((pp - 1) * (c["F"] + c["B"] - 2 * c["W"]))
    dp = simulate("dualpipe", pp, 2 * pp + 4, c)
    assert dp.bubble == pytest.approx((pp / 2 - 1) * (c["FB"] + c["B"] - 3 * c["W"]))
    # the published figure is the middle ranks' idle (they run the most F&B pairs)
    assert dp.ranks[pp // 2].idle == pytest.approx(dp.bubble)
    if pp > 4:  # at pp=4 every rank is a middle rank
        assert dp.ranks[0].idle < dp.bubble


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_dualpipev_matches_dualpipe_on_twice_the_ranks(pp):
    # same bubble on half the devices: DualPipeV on pp ranks (2pp stages)
    # idles like DualPipe on 2pp ranks, at the same per-stage costs
    v = simulate("dualpipev", pp, 4 * pp, PUBLISHED)
    d = simulate("dualpipe", 2 * pp, 4 * pp, PUBLISHED)
    assert v.bubble == pytest.approx(d.bubble)
    assert v.bubble == pytest.approx((pp - 1) * (PUBLISHED["FB"] + PUBLISHED["B"] - 3 * PUBLISHED["W"]))


@pytest.mark.parametrize("costs", COST_SETS)
@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4, 6])
def test_dualpipe_idle_does_not_grow_with_microbatches(costs, name, pp):
    idles = []
    for n in (2 * pp, 2 * pp + 2, 3 * pp, 4 * pp + 6):
        r = simulate(name, pp, n, costs)
        idles.append([x.idle for x in r.ranks])
    for other in idles[1:]:
        assert other == pytest.approx(idles[0])


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_activation_peaks_and_param_copies(pp):
    one = simulate("1f1b", pp, 3 * pp, PUBLISHED)
    assert one.ranks[0].peak_activations == pp
    assert [r.peak_activations for r in one.ranks] == list(range(pp, 0, -1))
    assert simulate("zb1p", pp, 3 * pp, PUBLISHED).peak_activations == pp
    dp = simulate("dualpipe", pp, 2 * pp + 2, PUBLISHED)
    assert dp.peak_activations == pp + 1
    assert {r.param_copies for r in dp.ranks} == {2}
    dv = simulate("dualpipev", pp, 2 * pp, PUBLISHED)
    assert dv.param_copies == 1 and one.param_copies == 1
    assert dv.peak_activations == 2 * pp + 1  # in half-size stages


def test_latency_applies_only_across_ranks():
    base = simulate("1f1b", 4, 8, PUBLISHED)
    slow = simulate("1f1b", 4, 8, PUBLISHED, latency=0.5)
    # the first backward on rank 0 waits for 3 forward hops and 3 backward hops
    assert slow.makespan > base.makespan
    t0 = {str(op): s for op, s, _ in base.ranks[0].timeline}
    t1 = {str(op): s for op, s, _ in slow.ranks[0].timeline}
    assert t1["B(s0,m0)"] - t0["B(s0,m0)"] == pytest.approx(6 * 0.5)
    # DualPipeV's two middle stages sit on the last rank: no latency between them
    v = simulate("dualpipev", 2, 4, PUBLISHED, latency=10.0)
    last = {str(op): (s, e) for op, s, e in v.ranks[1].timeline}
    assert last["F(s2,m0)"][0] == pytest.approx(last["F(s1,m0)"][1])


def test_timeline_is_in_order_and_respects_dependencies():
    r = simulate("dualpipe", 4, 8, PUBLISHED, latency=0.25)
    ends = {}
    for rank in r.ranks:
        prev_end = 0.0
        for ins, start, end in rank.timeline:
            assert start >= prev_end - 1e-12
            prev_end = end
            for op in ins.ops:
                ends[(op.kind, op.stage, op.microbatch, op.direction)] = (end, rank.rank)
    for rank in r.ranks:
        for ins, start, _ in rank.timeline:
            for op in ins.ops:
                if op.kind == "F" and op.stage > 0:
                    end, src = ends[("F", op.stage - 1, op.microbatch, op.direction)]
                    assert start >= end + (0.25 if src != rank.rank else 0) - 1e-12
    assert r.makespan == max(x.timeline[-1][2] for x in r.ranks)
    assert r.bubble_ratio == pytest.approx(sum(x.idle for x in r.ranks) / (4 * r.makespan))


def test_simulator_reports_deadlock():
    per_rank = [
        [Op("F", 0, 0), Op("B", 0, 0), Op("F", 0, 1), Op("B", 0, 1)],
        [Op("F", 1, 0), Op("F", 1, 1), Op("B", 1, 0), Op("B", 1, 1)],
    ]
    with pytest.raises(ScheduleError, match="cyclic wait"):
        simulate_ops("1f1b", 2, 2, per_rank, PUBLISHED)


def test_costs():
    c = normalize_costs({"F": 1, "B": 3, "W": 1})
    assert c == {"F": 1.0, "B": 3.0, "W": 1.0, "FB": 4.0, "I": 2.0}
    with pytest.raises(ValueError, match="W=3"):
        normalize_costs({"B": 2, "W": 3})
    with pytest.raises(ValueError, match="unknown"):
        normalize_costs({"X": 1})
    r = simulate("zb1p", 2, 4, {"F": 1, "B": 3, "W": 1})
    durations = {op.kind: e - s for op, s, e in r.ranks[0].timeline}
    assert durations == {"F": 1.0, "I": 2.0, "W": 1.0}


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_render_png(tmp_path, name):
    from mtrain.pipeline.render import render_timeline

    r = simulate(name, 4, 8, PUBLISHED)
    path = render_timeline(r, str(tmp_path / f"{name}.png"), title=name)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # plain per-rank lists of (op, start, end) work too (measured timelines)
    path2 = render_timeline([list(t) for t in r.timelines], str(tmp_path / "plain.png"))
    assert open(path2, "rb").read()[:4] == b"\x89PNG"


def test_zb1p_when_weight_gradient_dominates():
    # documented: with W > F the idle is the wait for the first input gradient
    c = {"F": 1, "B": 3, "W": 2}
    for pp in (4, 8):
        assert simulate("zb1p", pp, 3 * pp, c).bubble == pytest.approx((pp - 1) * (c["B"] - c["W"]))


@pytest.mark.parametrize("costs,expected", [
    ((1, 2, 1, 3), (2, 6, 14)),
    ((2, 3, 1, 4), (4, 12, 28)),
    ((1, 1, 0.5, 2), (2, 6, 14)),
    ((1.5, 3.5, 1.25, 4.5), (3.5, 11.25, 28.25)),
    ((1, 2, 0.5, 2), (2, 6.5, 16.5)),
    ((1, 3, 2, 3.5), (1.5, 4.5, 10.5)),
])
def test_dualpipe_bubble_table_in_docs(costs, expected):
    c = dict(zip(("F", "B", "W", "FB"), costs))
    got = tuple(simulate("dualpipe", pp, 2 * pp + 2, c).bubble for pp in (4, 8, 16))
    assert got == pytest.approx(expected)

"""Measured-trace views: the simulator's timelines pushed through a trace come
back unchanged, and the Chrome JSON holds the recorded intervals."""
from __future__ import annotations

import json

import pytest

from mtrain.pipeline.instructions import Op, Overlap
from mtrain.pipeline.render import render_timeline
from mtrain.pipeline.simulate import simulate
from mtrain.pipeline.trace import (OpRecord, RankTrace, bubble_percent, chrome_trace, idle_per_rank, makespan,
                                   to_timelines, write_chrome_trace)


def traces_from_sim(result, clock0: float = 100.0, shifts=None) -> list[RankTrace]:
    """Traces as if each rank had recorded the simulated step (clock starts at
    ``clock0``; ``shifts`` moves each rank's clock, as on separate hosts)."""
    out = []
    for rank, timeline in enumerate(result.timelines):
        shift = clock0 + (shifts[rank] if shifts else 0.0)
        ops = [OpRecord(ins, shift + start, shift + start, shift + end) for ins, start, end in timeline]
        out.append(RankTrace(rank, 10 + rank, shift, shift + timeline[-1][2], ops))
    return out


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_simulated_step_round_trips(schedule):
    sim = simulate(schedule, 4, 8, {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 2.5})
    traces = traces_from_sim(sim)
    assert to_timelines(traces) == [[(i, s, e) for i, s, e in tl] for tl in sim.timelines]
    assert makespan(traces) == pytest.approx(sim.makespan)
    assert idle_per_rank(traces) == pytest.approx([r.idle for r in sim.ranks])
    assert bubble_percent(traces) == pytest.approx([100 * r.idle / sim.makespan for r in sim.ranks])


def test_align_start_removes_clock_offsets():
    sim = simulate("1f1b", 4, 8)
    shifts = [0.0, 5.0, -3.0, 7.5]
    traces = traces_from_sim(sim, shifts=shifts)
    assert to_timelines(traces, align="start") == sim.timelines
    assert idle_per_rank(traces, align="start") == pytest.approx([r.idle for r in sim.ranks])
    # with clocks taken as they are, the span runs from the earliest start to the latest end
    ends = [tl[-1][2] + shift for tl, shift in zip(sim.timelines, shifts)]
    assert makespan(traces) == pytest.approx(max(ends) - min(shifts))


def test_measured_timeline_renders(tmp_path):
    sim = simulate("dualpipe", 4, 8, {"F": 1, "B": 2, "W": 1, "FB": 2.5})
    path = render_timeline(to_timelines(traces_from_sim(sim)), str(tmp_path / "measured.png"), "measured")
    assert (tmp_path / "measured.png").stat().st_size > 1000 and path.endswith("measured.png")


def test_chrome_trace_events():
    fwd, bwd = Op("F", 1, 3, 1), Op("B", 2, 0, 0)
    events = [(10.0015, "F", "compute_start", "attention"), (10.002, "F", "compute_end", "attention"),
              (10.002, "F", "comm_start", "dispatch"), (10.0021, "B", "compute_start", "output"),
              (10.0025, "B", "compute_end", "output"), (10.003, "F", "comm_wait", "dispatch")]
    ops = [OpRecord(Op("F", 1, 0), 10.0, 10.0, 10.001),
           OpRecord(Overlap(fwd, bwd), 10.001, 10.0015, 10.004, events)]
    trace = RankTrace(rank=1, global_rank=5, step_start=10.0, step_end=10.004, ops=ops)
    other = RankTrace(rank=0, global_rank=4, step_start=9.999, step_end=10.002,
                      ops=[OpRecord(Op("F", 0, 0), 9.999, 9.999, 10.0)])
    doc = json.loads(json.dumps(chrome_trace([trace, other])))
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]

    def find(name):
        (ev,) = [e for e in xs if e["name"] == name]
        return ev

    def close(ev, ts, dur, pid, tid):
        assert (ev["ts"], ev["dur"], ev["pid"], ev["tid"]) == (pytest.approx(ts), pytest.approx(dur), pid, tid)

    # time 0 is the earliest step start (rank 0's, 9.999 s); microseconds
    close(find("F(s0,m0)"), 0.0, 1000.0, 0, 0)
    close(find("F(s1,m0)"), 1000.0, 1000.0, 1, 0)
    close(find(Overlap(fwd, bwd).label()), 2500.0, 2500.0, 1, 0)
    close(find(f"wait {Overlap(fwd, bwd).label()}"), 2000.0, 500.0, 1, 1)
    close(find(f"attention {fwd.label()}"), 2500.0, 500.0, 1, 0)
    close(find(f"output {bwd.label()}"), 3100.0, 400.0, 1, 0)
    close(find(f"dispatch {fwd.label()}"), 3000.0, 1000.0, 1, 2)  # exchange F track
    assert len(xs) == 7
    assert find(Overlap(fwd, bwd).label())["args"] == {"kind": "overlap", "global_rank": 5}
    names = {(e["pid"], e["args"]["name"]) for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {(0, "pp rank 0"), (1, "pp rank 1")}


def test_write_chrome_trace(tmp_path):
    sim = simulate("zb1p", 2, 4)
    path = write_chrome_trace(str(tmp_path / "t.json"), traces_from_sim(sim))
    doc = json.load(open(path))
    assert sum(e["ph"] == "X" for e in doc["traceEvents"]) == sum(len(tl) for tl in sim.timelines)

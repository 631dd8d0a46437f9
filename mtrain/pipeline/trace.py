"""What a pipeline rank did during a real step, and views of it.

The executor records, per instruction, when it started waiting for its
inputs, when it started computing and when it ended, plus the compute and
exchange events of its program steps (:class:`~mtrain.runtime.context.EventLog`).
From that:

* :func:`chrome_trace` -- Chrome trace JSON (``{"traceEvents": [...]}``, opens in
  Perfetto / chrome://tracing): one process per rank; threads ``compute``
  (instructions, with their program steps nested), ``p2p wait`` (waiting for a
  stage input or gradient) and ``exchange F`` / ``exchange B`` (a chunk's
  exchanges, start to wait, of the forward / backward side);
* :func:`gather_traces` -- every rank's trace on one rank;
* :func:`to_timelines` -- the per-rank ``(instruction, start, end)`` lists that
  :func:`~mtrain.pipeline.render.render_timeline` draws, like the simulator's;
* :func:`idle_per_rank` / :func:`bubble_percent` -- measured idle against the
  common makespan, as the simulator defines it.

Times are ``time.perf_counter()`` seconds; on one host that clock is shared by
all processes, so traces of ranks on one machine line up as recorded. Ranks
on several hosts line up with ``align="start"`` (each rank's step start taken
as 0) when the step began after a barrier.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch.distributed as dist

from mtrain.pipeline.instructions import Instruction, Overlap

Event = tuple  # (time, side "F" | "B", kind, name) as EventLog records it

THREADS = {"compute": 0, "p2p wait": 1, "exchange F": 2, "exchange B": 3}


@dataclass
class OpRecord:
    instruction: Instruction
    wait_start: float  # inputs needed from here on
    start: float  # inputs there, compute starts
    end: float
    events: list = field(default_factory=list)  # EventLog events of its program steps

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class RankTrace:
    rank: int  # pipeline rank
    global_rank: int
    step_start: float
    step_end: float
    ops: list[OpRecord] = field(default_factory=list)

    @property
    def busy(self) -> float:
        return sum(op.duration for op in self.ops)


def _offsets(traces: Sequence[RankTrace], align: str) -> list[float]:
    if align == "clock":
        t0 = min(t.step_start for t in traces)
        return [t0] * len(traces)
    if align == "start":
        return [t.step_start for t in traces]
    raise ValueError(f"align must be 'clock' or 'start', got {align!r}")


def makespan(traces: Sequence[RankTrace], align: str = "clock") -> float:
    offs = _offsets(traces, align)
    return max(t.step_end - o for t, o in zip(traces, offs))


def idle_per_rank(traces: Sequence[RankTrace], align: str = "clock") -> list[float]:
    """``makespan - busy`` per rank (the simulator's definition)."""
    span = makespan(traces, align)
    return [span - t.busy for t in traces]


def bubble_percent(traces: Sequence[RankTrace], align: str = "clock") -> list[float]:
    """Idle share of the makespan per rank, in percent."""
    span = makespan(traces, align)
    return [100.0 * idle / span if span else 0.0 for idle in idle_per_rank(traces, align)]


def to_timelines(traces: Sequence[RankTrace], align: str = "clock") -> list[list[tuple[Instruction, float, float]]]:
    """Per pipeline rank, ``(instruction, start, end)`` with time 0 at the step
    start (seconds); the input ``render_timeline`` takes."""
    by_rank = sorted(zip(traces, _offsets(traces, align)), key=lambda item: item[0].rank)
    return [[(op.instruction, op.start - off, op.end - off) for op in t.ops] for t, off in by_rank]


def _pair_intervals(events: Sequence[Event], start_kind: str, end_kind: str):
    """Match start/end events of the same side and name in order."""
    open_: dict[tuple, list[float]] = {}
    for time, side, kind, name in events:
        if kind == start_kind:
            open_.setdefault((side, name), []).append(time)
        elif kind == end_kind and open_.get((side, name)):
            yield side, name, open_[(side, name)].pop(0), time


def _x(name: str, start: float, end: float, pid: int, thread: str, args: Optional[dict] = None) -> dict:
    ev = {"name": name, "ph": "X", "ts": start * 1e6, "dur": max(end - start, 0.0) * 1e6,
          "pid": pid, "tid": THREADS[thread]}
    if args:
        ev["args"] = args
    return ev


def chrome_events(trace: RankTrace, offset: float) -> list[dict]:
    pid = trace.rank
    out = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"pp rank {trace.rank}"}}]
    out += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}
            for name, tid in THREADS.items()]
    for op in trace.ops:
        ins = op.instruction
        label = ins.label()
        args = {"kind": ins.kind, "global_rank": trace.global_rank}
        if op.start > op.wait_start:
            out.append(_x(f"wait {label}", op.wait_start - offset, op.start - offset, pid, "p2p wait"))
        out.append(_x(label, op.start - offset, op.end - offset, pid, "compute", args))
        sides = {"F": ins.forward, "B": ins.backward} if isinstance(ins, Overlap) else {"F": ins, "B": ins}
        for side, name, t0, t1 in _pair_intervals(op.events, "compute_start", "compute_end"):
            out.append(_x(f"{name} {sides[side].label()}", t0 - offset, t1 - offset, pid, "compute"))
        for side, name, t0, t1 in _pair_intervals(op.events, "comm_start", "comm_wait"):
            out.append(_x(f"{name} {sides[side].label()}", t0 - offset, t1 - offset, pid, f"exchange {side}"))
    return out


def chrome_trace(traces: Sequence[RankTrace], align: str = "clock") -> dict:
    """Chrome trace JSON of one or more ranks (time 0: the earliest step start)."""
    events: list[dict] = []
    for t, off in zip(traces, _offsets(traces, align)):
        events += chrome_events(t, off)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str, traces: Sequence[RankTrace], align: str = "clock") -> str:
    with open(path, "w") as f:
        json.dump(chrome_trace(traces, align), f)
    return path


def gather_traces(trace: RankTrace, dst: int = 0, group: Optional[dist.ProcessGroup] = None
                  ) -> Optional[list[RankTrace]]:
    """Every rank's trace on global rank ``dst`` (others get None); collective
    over ``group`` (default: the world)."""
    size = dist.get_world_size(group)
    out = [None] * size if dist.get_rank() == dst else None
    dist.gather_object(trace, out, dst=dst, group=group)
    return out

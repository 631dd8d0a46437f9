"""Measured op costs from a recorded step (``logging.trace_step``: the
trainer's Chrome trace, ``<run_dir>/trace/step_N.json``), for the planner
to use instead of its estimates, and the prediction they give next to the
step that was measured.

Per model stage: the mean duration of its forwards (``F``), full
backwards (``B``), input-gradient (``I``) and weight-gradient (``W``)
halves, and per (forward stage, backward stage) the mean overlapped pair
(means, not medians: a step's length is the sum of its ops, outliers
included). The p2p latency is the median delay between an input's producer
finishing on another rank and its consumer starting, among consumers that
were idle waiting for it.
A kind the schedule never ran is derived (``B = I + W``, ``I = B - W``, no
``W``: 0), so any schedule's costs can be simulated from any other's trace
when the recorded one ran every kind needed.
"""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from mtrain.pipeline.instructions import Op, dependencies, done_key
from mtrain.pipeline.simulate import simulate

OP = re.compile(r"([FBIW])\((?:d(\d),)?s(\d+),m(\d+)\)")


class TraceError(ValueError):
    """The file is not a step trace the planner can read."""


def instruction_events(path: str | Path) -> list[dict]:
    """The compute instructions of a trace: ``{"rank", "kind", "stages", "start", "end"}`` in seconds."""
    try:
        data = json.loads(Path(path).read_text())
        events = data["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TraceError(f"{path}: not a step trace written by logging.trace_step ({e})") from None
    out = []
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("ph") != "X" or "kind" not in args:
            continue
        ops = OP.findall(ev["name"])
        if not ops:
            continue
        out.append({"rank": ev["pid"], "kind": args["kind"],
                    "ops": [Op(k, int(s), int(m), int(d or 0)) for k, d, s, m in ops],
                    "start": ev["ts"] / 1e6, "end": (ev["ts"] + ev["dur"]) / 1e6})
    if not out:
        raise TraceError(f"{path}: holds no pipeline instructions")
    return out


def p2p_latency(events: list[dict], schedule: str, pp: int) -> float:
    """Median delay from a producer's end to its idle consumer's start across ranks."""
    done = {done_key(op): (ev["end"], ev["rank"]) for ev in events for op in ev["ops"]}
    previous_end: dict[int, float] = {}
    delays = []
    for ev in sorted(events, key=lambda e: e["start"]):
        ready = [done[k] for op in ev["ops"] for k in dependencies(schedule, pp, op) if k in done]
        remote = [end for end, rank in ready if rank != ev["rank"]]
        if remote and max(end for end, _ in ready) == max(remote) >= previous_end.get(ev["rank"], 0.0):
            delays.append(ev["start"] - max(remote))
        previous_end[ev["rank"]] = ev["end"]
    return max(0.0, statistics.median(delays)) if delays else 0.0


def measured_costs(path: str | Path, num_stages: int, schedule: str | None = None, pp: int | None = None) -> dict:
    """``{"stages": [{F, B, W, F_comm, B_comm}], "pairs": {(f, b): s}, "latency": s,
    "makespan": s}`` from the trace at ``path`` (the latency needs the
    ``schedule`` and ``pp`` it ran, else 0)."""
    events = instruction_events(path)
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    pairs: dict[tuple[int, int], list[float]] = defaultdict(list)
    for ev in events:
        took = ev["end"] - ev["start"]
        if ev["kind"] == "overlap":
            fwd, bwd = ev["ops"]
            pairs[(fwd.stage, bwd.stage)].append(took)
        else:
            durations[(ev["ops"][0].kind, ev["ops"][0].stage)].append(took)
    stages = []
    for s in range(num_stages):
        med = {k: statistics.fmean(durations[(k, s)]) for k in "FBIW" if durations.get((k, s))}
        if "F" not in med:
            raise TraceError(f"{path}: no forward of stage {s} (the trace has {num_stages} stages?)")
        w = med.get("W", 0.0)
        b = med.get("B", med.get("I", 0.0) + w)
        if "B" not in med and "I" not in med:
            raise TraceError(f"{path}: no backward of stage {s}")
        stages.append({"F": med["F"], "B": b, "W": min(w, b), "F_comm": 0.0, "B_comm": 0.0})
    latency = p2p_latency(events, schedule, pp) if schedule is not None else 0.0
    return {"stages": stages, "pairs": {k: statistics.fmean(v) for k, v in pairs.items()}, "latency": latency,
            "makespan": max(ev["end"] for ev in events) - min(ev["start"] for ev in events)}


def compare(path: str | Path, schedule: str, pp: int, num_microbatches: int, num_stages: int) -> dict:
    """The measured pipeline makespan of a trace next to the simulator's with
    the trace's own op costs (how far the planner's model of the schedule is
    from the run, with the op costs right)."""
    measured = measured_costs(path, num_stages, schedule, pp)
    sim = simulate(schedule, pp, num_microbatches, stage_costs=measured["stages"], pair_costs=measured["pairs"],
                   latency=measured["latency"])
    return {"schedule": schedule, "pp": pp, "num_microbatches": num_microbatches,
            "measured_s": measured["makespan"], "predicted_s": sim.makespan,
            "ratio": sim.makespan / measured["makespan"], "costs": measured}

"""Timeline simulation of a schedule with per-op costs.

Cost model: every rank runs its instructions in order; an instruction starts
when the rank is free and all its data dependencies are complete (a dependency
produced on another rank arrives ``latency`` later; on the same rank it is
immediate). Durations: ``F``, ``B`` (full backward), ``W`` (weight gradient),
``I = B - W`` (input gradient), and ``FB`` for an overlapped F&B pair (both
halves complete together at its end).

Activation rule (unit: one stage's activations for one micro-batch): a
forward adds one when it starts; a backward (B or I) frees one when it
completes; a W frees nothing (the weight-gradient inputs are not counted).
The count is taken in each rank's execution order, so inside an overlapped
pair the forward's new activations and the backward's old ones are both held.
With this rule 1F1B peaks at ``pp`` on rank 0 and DualPipe at ``pp+1``. For
DualPipeV the unit is a stage of a 2*pp-stage model, i.e. half the size.

Bubble: ``idle = makespan - busy`` per rank; the bubble ratio is the total
idle over ``pp * makespan``.

Per-stage costs (``stage_costs``, one mapping per model stage, as the planner
estimates them): an op costs its own stage's ``F``/``B``/``I``/``W``, and an
overlapped pair costs :func:`pair_cost` of its two stages: each side's
exchange time (``F_comm``/``B_comm``, part of ``F`` and ``B``/``I``) hides
behind the other side's compute up to that compute's length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from mtrain.pipeline.instructions import Instruction, Overlap, dependencies, done_key
from mtrain.pipeline.schedule_rules import num_directions, num_model_stages, param_copies
from mtrain.pipeline.schedules import build_all_ranks
from mtrain.pipeline.validate import ScheduleError, deadlock_problems

DEFAULT_COSTS = {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 2.5}


def normalize_costs(costs: Mapping[str, float] | None) -> dict[str, float]:
    """Fill defaults (F=1, B=2, W=1, FB=F+B) and check the values; returns
    F, B, W, I, FB."""
    costs = dict(costs or {})
    unknown = set(costs) - {"F", "B", "W", "FB"}
    if unknown:
        raise ValueError(f"unknown cost name(s) {sorted(unknown)}; use F, B, W, FB")
    out = {k: float(costs.get(k, DEFAULT_COSTS[k])) for k in ("F", "B", "W")}
    out["FB"] = float(costs["FB"]) if "FB" in costs else out["F"] + out["B"]
    for k, v in out.items():
        if v < 0:
            raise ValueError(f"cost {k}={v} must not be negative")
    if out["W"] > out["B"]:
        raise ValueError(f"cost W={out['W']} must not exceed B={out['B']} (B = I + W)")
    out["I"] = out["B"] - out["W"]
    return out


def pair_cost(forward: Mapping[str, float], backward: Mapping[str, float], backward_kind: str = "B") -> float:
    """An overlapped F&B pair: both sides' compute back to back, plus whatever
    of each side's exchange outlasts the other side's compute."""
    f_comm, b_comm = forward.get("F_comm", 0.0), backward.get("B_comm", 0.0)
    f_compute = forward["F"] - f_comm
    b_compute = backward[backward_kind] - b_comm
    return f_compute + b_compute + max(0.0, f_comm - b_compute) + max(0.0, b_comm - f_compute)


def op_cost(ins: Instruction, costs: Mapping[str, float],
            stage_costs: Sequence[Mapping[str, float]] | None = None,
            pair_costs: Mapping[tuple[int, int], float] | None = None) -> float:
    """An instruction's duration; ``pair_costs`` (keyed by the forward and
    backward stages, e.g. measured) take precedence over :func:`pair_cost`."""
    if stage_costs is None:
        return costs["FB"] if isinstance(ins, Overlap) else costs[ins.kind]
    if isinstance(ins, Overlap):
        key = (ins.forward.stage, ins.backward.stage)
        if pair_costs and key in pair_costs:
            return pair_costs[key]
        return pair_cost(stage_costs[ins.forward.stage], stage_costs[ins.backward.stage], ins.backward.kind)
    return stage_costs[ins.stage][ins.kind]


def normalize_stage_costs(stage_costs: Sequence[Mapping[str, float]], num_stages: int) -> list[dict[str, float]]:
    """Check per-stage costs (F, B, W and optional F_comm, B_comm) and add I = B - W."""
    if len(stage_costs) != num_stages:
        raise ValueError(f"stage_costs has {len(stage_costs)} entries for a {num_stages}-stage schedule")
    out = []
    for i, c in enumerate(stage_costs):
        missing = {"F", "B", "W"} - set(c)
        if missing:
            raise ValueError(f"stage_costs[{i}] lacks {sorted(missing)}")
        d = {k: float(v) for k, v in c.items()}
        if min(d.values()) < 0 or d["W"] > d["B"]:
            raise ValueError(f"stage_costs[{i}]={d}: costs must be >= 0 and W <= B (B = I + W)")
        d["I"] = d["B"] - d["W"]
        out.append(d)
    return out


@dataclass
class RankResult:
    rank: int
    timeline: list[tuple[Instruction, float, float]]
    busy: float
    idle: float
    peak_activations: int
    param_copies: int

    def to_json(self, with_direction: bool = False) -> dict:
        return {
            "rank": self.rank,
            "busy": self.busy,
            "idle": self.idle,
            "peak_activations": self.peak_activations,
            "param_copies": self.param_copies,
            "ops": [
                dict(ins.to_json(with_direction), start=start, end=end)
                for ins, start, end in self.timeline
            ],
        }


@dataclass
class SimResult:
    schedule: str
    pp: int
    num_microbatches: int
    costs: dict[str, float]
    latency: float
    ranks: list[RankResult]
    makespan: float
    total_idle: float
    bubble_ratio: float
    param_copies: int
    num_stages: int = field(default=0)

    @property
    def timelines(self) -> list[list[tuple[Instruction, float, float]]]:
        return [r.timeline for r in self.ranks]

    @property
    def peak_activations(self) -> int:
        return max(r.peak_activations for r in self.ranks)

    @property
    def bubble(self) -> float:
        """The largest per-rank idle time: the figure the published bubble
        formulas give (for DualPipe the middle ranks, which run the most
        overlapped pairs and so have the least busy time)."""
        return max(r.idle for r in self.ranks)

    def to_json(self) -> dict:
        with_dir = num_directions(self.schedule) > 1
        return {
            "schedule": self.schedule,
            "pp": self.pp,
            "num_microbatches": self.num_microbatches,
            "num_stages": self.num_stages,
            "costs": self.costs,
            "latency": self.latency,
            "makespan": self.makespan,
            "total_idle": self.total_idle,
            "bubble_ratio": self.bubble_ratio,
            "bubble": self.bubble,
            "peak_activations": self.peak_activations,
            "param_copies": self.param_copies,
            "ranks": [r.to_json(with_dir) for r in self.ranks],
        }


def _activation_peak(ops: Sequence[Instruction]) -> int:
    live = peak = 0
    for ins in ops:
        for op in ins.ops:
            if op.kind == "F":
                live += 1
                peak = max(peak, live)
        for op in ins.ops:
            if op.kind in ("B", "I"):
                live -= 1
    return peak


def simulate_ops(name: str, pp: int, num_microbatches: int, per_rank: Sequence[Sequence[Instruction]],
                 costs: Mapping[str, float] | None = None, latency: float = 0.0,
                 stage_costs: Sequence[Mapping[str, float]] | None = None,
                 pair_costs: Mapping[tuple[int, int], float] | None = None) -> SimResult:
    """Simulate given per-rank lists (see module doc); ``stage_costs`` (and
    ``pair_costs``), when given, replace ``costs``. Raises ``ScheduleError``
    if the lists deadlock."""
    c = normalize_costs(costs)
    if stage_costs is not None:
        stage_costs = normalize_stage_costs(stage_costs, num_model_stages(name, pp))
    if latency < 0:
        raise ValueError(f"latency={latency} must not be negative")
    finish: dict[tuple, tuple[float, int]] = {}  # done key -> (time, rank)
    free = [0.0] * pp
    pos = [0] * pp
    timelines: list[list[tuple[Instruction, float, float]]] = [[] for _ in range(pp)]
    progress = True
    while progress:
        progress = False
        for rank in range(pp):
            ops = per_rank[rank]
            while pos[rank] < len(ops):
                ins = ops[pos[rank]]
                start = free[rank]
                ready = True
                for op in ins.ops:
                    for key in dependencies(name, pp, op):
                        if key not in finish:
                            ready = False
                            break
                        t, src = finish[key]
                        start = max(start, t + (latency if src != rank else 0.0))
                    if not ready:
                        break
                if not ready:
                    break
                end = start + op_cost(ins, c, stage_costs, pair_costs)
                for op in ins.ops:
                    finish[done_key(op)] = (end, rank)
                timelines[rank].append((ins, start, end))
                free[rank] = end
                pos[rank] += 1
                progress = True
    if any(pos[r] < len(per_rank[r]) for r in range(pp)):
        raise ScheduleError(deadlock_problems(name, pp, per_rank))

    makespan = max((tl[-1][2] for tl in timelines if tl), default=0.0)
    copies = param_copies(name)
    ranks = []
    for rank in range(pp):
        busy = sum(end - start for _, start, end in timelines[rank])
        ranks.append(RankResult(rank, timelines[rank], busy, makespan - busy,
                                _activation_peak(per_rank[rank]), copies))
    total_idle = sum(r.idle for r in ranks)
    return SimResult(
        schedule=name, pp=pp, num_microbatches=num_microbatches, costs=c, latency=latency,
        ranks=ranks, makespan=makespan, total_idle=total_idle,
        bubble_ratio=total_idle / (pp * makespan) if makespan else 0.0,
        param_copies=copies, num_stages=num_model_stages(name, pp),
    )


def simulate(name: str, pp: int, num_microbatches: int, costs: Mapping[str, float] | None = None,
             latency: float = 0.0, stage_costs: Sequence[Mapping[str, float]] | None = None,
             pair_costs: Mapping[tuple[int, int], float] | None = None) -> SimResult:
    """Build schedule ``name`` for every rank and simulate it."""
    return simulate_ops(name, pp, num_microbatches, build_all_ranks(name, pp, num_microbatches), costs, latency,
                        stage_costs, pair_costs)

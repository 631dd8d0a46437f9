"""Checks that a schedule (per-rank instruction lists) can train correctly.

* every instruction runs on the rank that holds its stage, for a micro-batch
  that exists (and, for DualPipe, belongs to the instruction's direction);
* every micro-batch gets exactly one forward and one backward on every stage
  it visits (per direction for DualPipe): a B, or an I plus exactly one W;
* a W comes after its I on the same rank;
* the lists can be executed: ranks run their instructions in order, an
  instruction waits for its data dependencies (F(s,m) after F(s-1,m);
  B/I(s,m) after F(s,m) and after B/I(s+1,m); W(s,m) after I(s,m)). If at some
  point no rank can move, the cyclic wait is reported, naming ranks and ops.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from mtrain.pipeline.instructions import (
    Instruction,
    Op,
    Overlap,
    dependencies,
    done_key,
    key_label,
)
from mtrain.pipeline.schedule_rules import microbatches_of_direction, num_directions, num_model_stages, stage_rank


class ScheduleError(ValueError):
    """A schedule that fails validation; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid schedule:\n  " + "\n  ".join(problems))
        self.problems = problems


def _placement_problems(name: str, pp: int, n: int, per_rank) -> list[str]:
    problems = []
    stages = num_model_stages(name, pp)
    for rank, ops in enumerate(per_rank):
        for pos, ins in enumerate(ops):
            if not isinstance(ins, (Op, Overlap)):
                problems.append(f"rank {rank} instruction {pos}: {ins!r} is not an Op or Overlap")
                continue
            for op in ins.ops:
                if op.direction >= num_directions(name):
                    problems.append(f"rank {rank}: {op} has direction {op.direction}, {name} has only direction 0")
                    continue
                if not 0 <= op.stage < stages:
                    problems.append(f"rank {rank}: {op} names stage {op.stage}, {name} with pp={pp} has stages 0..{stages - 1}")
                    continue
                if op.microbatch not in microbatches_of_direction(name, n, op.direction):
                    mbs = microbatches_of_direction(name, n, op.direction)
                    problems.append(
                        f"rank {rank}: {op} names micro-batch {op.microbatch}, outside "
                        f"{mbs.start}..{mbs.stop - 1}" + (f" of direction {op.direction}" if num_directions(name) > 1 else "")
                    )
                    continue
                owner = stage_rank(name, pp, op.stage, op.direction)
                if owner != rank:
                    problems.append(f"rank {rank}: {op} belongs on rank {owner}, which holds that stage")
    return problems


def _count_problems(name: str, pp: int, n: int, per_rank) -> list[str]:
    problems = []
    counts: Counter = Counter()
    where: dict[tuple, tuple[int, int]] = {}  # (kind, s, m, d) -> (rank, position) of first occurrence
    for rank, ops in enumerate(per_rank):
        for pos, ins in enumerate(ops):
            if not isinstance(ins, (Op, Overlap)):
                continue
            for op in ins.ops:
                key = (op.kind, op.stage, op.microbatch, op.direction)
                counts[key] += 1
                where.setdefault(key, (rank, pos))
    for d in range(num_directions(name)):
        for s in range(num_model_stages(name, pp)):
            for m in microbatches_of_direction(name, n, d):
                label = Op("F", s, m, d).label()[2:-1]
                f, b, i, w = (counts[(k, s, m, d)] for k in "FBIW")
                if f != 1:
                    problems.append(f"stage/micro-batch ({label}) has {f} forwards F, needs exactly 1"
                                    + (" (missing forward)" if f == 0 else ""))
                if b + i == 0:
                    problems.append(f"stage/micro-batch ({label}) has no backward: missing B (or I + W)")
                elif b + i > 1:
                    problems.append(f"stage/micro-batch ({label}) has {b} B and {i} I, needs exactly one backward")
                if i == 1 and w == 0:
                    problems.append(f"stage/micro-batch ({label}) has I but no W: missing weight gradient")
                if w > i:
                    problems.append(f"stage/micro-batch ({label}) has {w} W for {i} I: W without its I")
                elif i and w > 1:
                    problems.append(f"stage/micro-batch ({label}) has {w} W, needs exactly 1")
                if i == 1 and w == 1:
                    ri, pi = where[("I", s, m, d)]
                    rw, pw = where[("W", s, m, d)]
                    if ri == rw and pw < pi:
                        problems.append(
                            f"rank {rw}: W({label}) at position {pw} precedes its I at position {pi}"
                        )
                    elif ri != rw:
                        problems.append(f"W({label}) on rank {rw} but its I on rank {ri}")
    return problems


def _ready(name: str, pp: int, ins: Instruction, done: set) -> list[tuple]:
    """Dependency keys of ``ins`` not yet done (an overlap's two halves must not
    depend on each other)."""
    missing = []
    for op in ins.ops:
        for key in dependencies(name, pp, op):
            if key not in done:
                missing.append(key)
    return missing


def deadlock_problems(name: str, pp: int, per_rank: Sequence[Sequence[Instruction]]) -> list[str]:
    """Run the lists in order on every rank with dependencies only; report
    the wait that stops all ranks, if any."""
    done: set = set()
    pos = [0] * len(per_rank)
    progress = True
    while progress:
        progress = False
        for rank, ops in enumerate(per_rank):
            while pos[rank] < len(ops) and not _ready(name, pp, ops[pos[rank]], done):
                for op in ops[pos[rank]].ops:
                    done.add(done_key(op))
                pos[rank] += 1
                progress = True
    stuck = [r for r, ops in enumerate(per_rank) if pos[r] < len(ops)]
    if not stuck:
        return []

    # who would produce each awaited key: first not-yet-run instruction producing it
    producer: dict[tuple, tuple[int, Instruction]] = {}
    for rank, ops in enumerate(per_rank):
        for ins in ops[pos[rank]:]:
            for op in ins.ops:
                producer.setdefault(done_key(op), (rank, ins))

    waits: dict[int, list[tuple[tuple, int | None]]] = {}
    for r in stuck:
        ins = per_rank[r][pos[r]]
        waits[r] = [(k, producer.get(k, (None, None))[0]) for k in _ready(name, pp, ins, done)]

    problems = []
    for r in stuck:
        ins = per_rank[r][pos[r]]
        for key, owner in waits[r]:
            if owner is None:
                problems.append(f"deadlock: rank {r} at {ins} waits for {key_label(key)}, which no rank runs")

    # follow "rank waits on rank" edges to find a cycle
    seen_cycles = set()
    for start in stuck:
        path, r = [], start
        while r is not None and r not in path:
            path.append(r)
            nxt = [o for _, o in waits.get(r, []) if o is not None and o in waits]
            r = nxt[0] if nxt else None
        if r is None:
            continue
        cycle = path[path.index(r):]
        canon = tuple(sorted(cycle))
        if canon in seen_cycles:
            continue
        seen_cycles.add(canon)
        steps = []
        for i, a in enumerate(cycle):
            b = cycle[(i + 1) % len(cycle)]
            key = next(k for k, o in waits[a] if o == b)
            steps.append(
                f"rank {a} at {per_rank[a][pos[a]]} waits for {key_label(key)} "
                f"from rank {b} (stuck at {per_rank[b][pos[b]]})"
            )
        problems.append("deadlock: cyclic wait: " + "; ".join(steps))
    if not problems:
        problems.append(
            "deadlock: no rank can progress; "
            + "; ".join(f"rank {r} at {per_rank[r][pos[r]]}" for r in stuck)
        )
    return problems


def schedule_problems(name: str, pp: int, num_microbatches: int,
                      per_rank_ops: Sequence[Sequence[Instruction]]) -> list[str]:
    """Every problem found in ``per_rank_ops``; empty when the schedule is valid."""
    if len(per_rank_ops) != pp:
        return [f"{name} with pp={pp} needs {pp} rank lists, got {len(per_rank_ops)}"]
    problems = _placement_problems(name, pp, num_microbatches, per_rank_ops)
    if problems:
        return problems
    problems = _count_problems(name, pp, num_microbatches, per_rank_ops)
    problems += deadlock_problems(name, pp, per_rank_ops)
    return problems


def validate_schedule(name: str, pp: int, num_microbatches: int,
                      per_rank_ops: Sequence[Sequence[Instruction]], *, strict: bool = False) -> list[str]:
    """The problems of ``per_rank_ops`` (empty when valid). With
    ``strict=True`` raise ``ScheduleError`` instead of returning problems."""
    problems = schedule_problems(name, pp, num_microbatches, per_rank_ops)
    if problems and strict:
        raise ScheduleError(problems)
    return problems

"""The instruction set of one pipeline rank, and where its data comes from.

A schedule is a list, per pipeline rank, of compute instructions run in order:

* ``Op("F", stage, microbatch)``   forward of one stage for one micro-batch;
* ``Op("B", stage, microbatch)``   full backward (input and weight gradients);
* ``Op("I", stage, microbatch)``   backward for the input gradient only;
* ``Op("W", stage, microbatch)``   the deferred weight gradient of an earlier ``I``;
* ``Overlap(forward, backward)``   a forward (``F``) of one micro-batch run
  together with the backward (``B``) of another, so that one's communication
  hides behind the other's compute.

Sends and receives are not instructions: they follow from the data
dependencies (the forward of stage ``s`` needs the output of stage ``s-1`` on
the rank that holds it; the backward of stage ``s`` needs the input gradient
of stage ``s+1``). The helpers at the bottom of this module say which rank
that is (asking :mod:`~mtrain.pipeline.schedule_rules`), so the runtime needs
no schedule knowledge.

``direction`` is only used by DualPipe, whose two halves of the micro-batches
flow through the pipeline in opposite directions over two copies of the same
stages: direction 0 enters at rank 0 (stage ``s`` on rank ``s``), direction 1
enters at rank ``pp-1`` (stage ``s`` on rank ``pp-1-s``). Every other schedule
uses direction 0 only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Union

from mtrain.pipeline.schedule_rules import num_directions, num_model_stages, stage_rank

KINDS = ("F", "B", "I", "W")
FORWARD, BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT = KINDS


@dataclass(frozen=True)
class Op:
    """One compute instruction: ``kind`` of global ``stage`` for global ``microbatch``."""

    kind: str
    stage: int
    microbatch: int
    direction: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Op kind must be one of {KINDS}, got {self.kind!r}")
        if self.direction not in (0, 1):
            raise ValueError(f"Op direction must be 0 or 1, got {self.direction!r}")

    def to_json(self, with_direction: bool | None = None) -> dict:
        """``{"kind", "stage", "microbatch"}`` plus ``"direction"`` when asked
        (default: only when it is not 0)."""
        out = {"kind": self.kind, "stage": self.stage, "microbatch": self.microbatch}
        if with_direction or (with_direction is None and self.direction):
            out["direction"] = self.direction
        return out

    def label(self) -> str:
        d = f"d{self.direction}," if self.direction else ""
        return f"{self.kind}({d}s{self.stage},m{self.microbatch})"

    __str__ = label

    @property
    def ops(self) -> tuple["Op", ...]:
        return (self,)


@dataclass(frozen=True)
class Overlap:
    """Forward of one micro-batch overlapped with the backward of another."""

    forward: Op
    backward: Op
    kind = "overlap"

    def __post_init__(self) -> None:
        if self.forward.kind != FORWARD:
            raise ValueError(f"Overlap.forward must be an F op, got {self.forward}")
        if self.backward.kind not in (BACKWARD, BACKWARD_INPUT):
            raise ValueError(f"Overlap.backward must be a B (or I) op, got {self.backward}")

    def to_json(self, with_direction: bool | None = None) -> dict:
        return {
            "kind": "overlap",
            "forward": self.forward.to_json(with_direction),
            "backward": self.backward.to_json(with_direction),
        }

    def label(self) -> str:
        return f"[{self.forward.label()}&{self.backward.label()}]"

    __str__ = label

    @property
    def ops(self) -> tuple[Op, Op]:
        return (self.forward, self.backward)


Instruction = Union[Op, Overlap]


def instruction_from_json(data: dict) -> Instruction:
    """Inverse of ``to_json``."""
    if data["kind"] == "overlap":
        return Overlap(instruction_from_json(data["forward"]), instruction_from_json(data["backward"]))
    return Op(data["kind"], int(data["stage"]), int(data["microbatch"]), int(data.get("direction", 0)))


def schedule_to_json(schedule: str, per_rank: Iterable[Iterable[Instruction]]) -> list[list[dict]]:
    """Per rank, the instructions as JSON-ready dicts; DualPipe ops carry ``direction``."""
    with_direction = num_directions(schedule) > 1
    return [[ins.to_json(with_direction) for ins in ops] for ops in per_rank]


def dumps(schedule: str, per_rank: Iterable[Iterable[Instruction]]) -> str:
    return json.dumps(schedule_to_json(schedule, per_rank))


# --------------------------------------------------------------------------
# Data flow: where a stage's inputs come from and its outputs go to.
# --------------------------------------------------------------------------

def prev_stage(schedule: str, pp: int, stage: int, direction: int = 0) -> int | None:
    """Stage whose forward output feeds ``stage`` (None for the first stage)."""
    num_model_stages(schedule, pp)  # same stage indices in both directions
    return stage - 1 if stage > 0 else None


def next_stage(schedule: str, pp: int, stage: int, direction: int = 0) -> int | None:
    """Stage fed by ``stage``'s forward output (None for the last stage, which
    computes the loss)."""
    return stage + 1 if stage + 1 < num_model_stages(schedule, pp) else None


def is_first_stage(schedule: str, pp: int, stage: int) -> bool:
    return stage == 0


def is_last_stage(schedule: str, pp: int, stage: int) -> bool:
    return stage == num_model_stages(schedule, pp) - 1


def forward_source_rank(schedule: str, pp: int, stage: int, direction: int = 0) -> int | None:
    """Rank to receive the forward input of ``stage`` from (None: data loader)."""
    p = prev_stage(schedule, pp, stage, direction)
    return None if p is None else stage_rank(schedule, pp, p, direction)


def forward_dest_rank(schedule: str, pp: int, stage: int, direction: int = 0) -> int | None:
    """Rank to send ``stage``'s forward output to (None: the loss is local)."""
    n = next_stage(schedule, pp, stage, direction)
    return None if n is None else stage_rank(schedule, pp, n, direction)


def backward_source_rank(schedule: str, pp: int, stage: int, direction: int = 0) -> int | None:
    """Rank to receive ``stage``'s output gradient from (None: from the loss)."""
    return forward_dest_rank(schedule, pp, stage, direction)


def backward_dest_rank(schedule: str, pp: int, stage: int, direction: int = 0) -> int | None:
    """Rank to send ``stage``'s input gradient to (None: first stage)."""
    return forward_source_rank(schedule, pp, stage, direction)


def done_key(op: Op) -> tuple:
    """Key under which ``op``'s completion is recorded. B and I both produce the
    input gradient of (stage, microbatch), so they share the key ``"G"``."""
    kind = "G" if op.kind in (BACKWARD, BACKWARD_INPUT) else op.kind
    return (kind, op.stage, op.microbatch, op.direction)


def dependencies(schedule: str, pp: int, op: Op) -> list[tuple]:
    """Completion keys (see ``done_key``) that ``op`` waits for:

    * F(s, m): F(s-1, m)
    * B/I(s, m): F(s, m) and the input gradient (B or I) of (s+1, m)
    * W(s, m): I(s, m)
    """
    d = op.direction
    if op.kind == FORWARD:
        p = prev_stage(schedule, pp, op.stage, d)
        return [] if p is None else [(FORWARD, p, op.microbatch, d)]
    if op.kind in (BACKWARD, BACKWARD_INPUT):
        deps = [(FORWARD, op.stage, op.microbatch, d)]
        n = next_stage(schedule, pp, op.stage, d)
        if n is not None:
            deps.append(("G", n, op.microbatch, d))
        return deps
    return [("G", op.stage, op.microbatch, d)]


def key_label(key: tuple) -> str:
    kind, stage, mb, d = key
    name = "B/I" if kind == "G" else kind
    dd = f"d{d}," if d else ""
    return f"{name}({dd}s{stage},m{mb})"


def key_rank(schedule: str, pp: int, key: tuple) -> int:
    return stage_rank(schedule, pp, key[1], key[3])

"""Facts every schedule user needs without building a schedule: names,
argument rules, which model stages a pipeline rank holds, and the frozen
:class:`Placement` of one rank.

This module and the schedule builders are the only code that tells schedules
apart by name; everything else asks the rules below or a Placement. Kept apart
from the builders so that config checks can use it before anything heavy is
imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SCHEDULE_NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class ScheduleRules:
    """What a schedule does with stages and ranks."""

    name: str
    stages_per_rank: int  # model stages = stages_per_rank * pp, except mirrored copies
    mirrored: bool  # DualPipe: every stage on two ranks, micro-batches in two directions
    even_pp: bool  # pp must be even
    even_microbatches: bool
    min_microbatches_per_pp: int  # num_microbatches >= this * pp (0: no rule)

    @property
    def directions(self) -> int:
        return 2 if self.mirrored else 1

    @property
    def copies(self) -> int:
        """How many ranks hold each stage's parameters."""
        return 2 if self.mirrored else 1


RULES = {
    "1f1b": ScheduleRules("1f1b", 1, False, False, False, 0),
    "zb1p": ScheduleRules("zb1p", 1, False, False, False, 0),
    # Rank r holds stage r of direction 0 and stage pp-1-r of direction 1.
    "dualpipe": ScheduleRules("dualpipe", 1, True, True, True, 2),
    # Rank r holds stages r and 2pp-1-r of a 2pp-stage model.
    "dualpipev": ScheduleRules("dualpipev", 2, False, False, False, 2),
}


def rules(schedule: str) -> ScheduleRules:
    try:
        return RULES[str(schedule)]
    except KeyError:
        raise ValueError(f"parallel.schedule={schedule!r} is not a known schedule; "
                         f"choose one of {', '.join(SCHEDULE_NAMES)}") from None


def schedule_errors(schedule: str, pp: int, num_microbatches: Optional[int]) -> list[str]:
    """Every reason ``schedule`` cannot run with ``pp`` ranks and
    ``num_microbatches`` micro-batches, each naming the fields and the fix.
    ``num_microbatches`` None checks the schedule and ``pp`` only (a count
    derived from the global batch is checked against :func:`microbatch_rule`)."""
    if str(schedule) not in RULES:
        return [
            f"parallel.schedule={schedule!r} is not a known schedule; "
            f"choose one of {', '.join(SCHEDULE_NAMES)}"
        ]
    r = rules(schedule)
    errors = []
    if pp < 1:
        errors.append(f"parallel.pp={pp} must be at least 1")
    if r.even_pp and pp % 2:
        # The even sizes next to pp, each named once (pp=1 has only one: 2).
        sizes = " or ".join(f"pp={n}" for n in dict.fromkeys((pp - 1, pp + 1)) if n >= 2)
        without = "parallel.schedule=1f1b (pp=1 runs no pipeline)" if pp == 1 else "parallel.schedule=dualpipev"
        errors.append(f"parallel.schedule={r.name} needs an even parallel.pp (got pp={pp}): use {sizes}, or {without}")
    if num_microbatches is None:
        return errors
    if num_microbatches < 1:
        errors.append(f"parallel.num_microbatches={num_microbatches} must be at least 1")
    multiple, minimum = microbatch_rule(schedule, max(pp, 1))
    if num_microbatches % multiple or num_microbatches < minimum:
        # One message with one fix: the nearest count that satisfies every rule.
        fix = max(minimum, -(-num_microbatches // multiple) * multiple)
        needs = ["an even parallel.num_microbatches (half enter at each end)"] if num_microbatches % multiple else []
        if num_microbatches < minimum:
            needs.append(f"parallel.num_microbatches >= {r.min_microbatches_per_pp}*pp = {minimum}")
        errors.append(f"parallel.schedule={r.name} needs {' and '.join(needs)} (got {num_microbatches}): "
                      f"use {fix}" + (", or lower pp" if r.min_microbatches_per_pp and pp > 1 else ""))
    return errors


def microbatch_rule(schedule: str, pp: int) -> tuple[int, int]:
    """``(multiple, minimum)``: the micro-batch counts ``schedule`` runs with
    ``pp`` ranks are the multiples of ``multiple`` that are at least ``minimum``."""
    r = rules(schedule)
    multiple = 2 if r.even_microbatches else 1
    minimum = max(r.min_microbatches_per_pp * pp, 1)
    return multiple, -(-minimum // multiple) * multiple


def num_model_stages(schedule: str, pp: int) -> int:
    """How many pieces the model is cut into (DualPipeV cuts it into 2*pp)."""
    return rules(schedule).stages_per_rank * pp


def stages_of_rank(schedule: str, pp: int, rank: int) -> list[int]:
    """Model stages held by pipeline rank ``rank``, in the order of its chunks.

    DualPipe: stage ``rank`` of the forward direction and stage ``pp-1-rank`` of
    the reverse direction (the same stage indices, so every stage exists twice).
    DualPipeV: stages ``rank`` and ``2*pp-1-rank`` of a 2*pp-stage model.
    """
    r = rules(schedule)
    if r.mirrored or r.stages_per_rank == 2:
        return [rank, r.stages_per_rank * pp - 1 - rank]
    return [rank]


def param_copies(schedule: str) -> int:
    """How many ranks hold each stage's parameters."""
    return rules(schedule).copies


def num_directions(schedule: str) -> int:
    return rules(schedule).directions


def stage_rank(schedule: str, pp: int, stage: int, direction: int = 0) -> int:
    """The pipeline rank that runs ``stage`` for micro-batches of ``direction``."""
    r, n = rules(schedule), num_model_stages(schedule, pp)
    if not 0 <= stage < n:
        raise ValueError(f"stage {stage} out of range for {r.name} with pp={pp} ({n} stages)")
    if not 0 <= direction < r.directions:
        if r.mirrored:
            raise ValueError(f"{r.name} direction must be 0 or 1, got {direction}")
        raise ValueError(f"{r.name} has only direction 0, got {direction}")
    if r.mirrored:
        return stage if direction == 0 else pp - 1 - stage
    return stage if stage < pp else n - 1 - stage  # a V: the second half comes back


def microbatches_of_direction(schedule: str, num_microbatches: int, direction: int) -> range:
    """Mirrored schedules send the first half of the micro-batches in direction
    0 and the second half in direction 1; the others use direction 0 only."""
    if rules(schedule).mirrored:
        half = num_microbatches // 2
        return range(0, half) if direction == 0 else range(half, num_microbatches)
    return range(num_microbatches) if direction == 0 else range(0)


def copy_groups(schedule: str, pp: int) -> list[list[int]]:
    """Pipeline positions holding copies of the same stages (each group
    sums its gradients); empty when every stage lives on one rank."""
    if rules(schedule).copies == 1:
        return []
    return [[r, pp - 1 - r] for r in range(pp // 2)]


ChunkKey = tuple  # (stage, direction)


@dataclass(frozen=True)
class Placement:
    """What pipeline rank ``rank`` holds under ``schedule`` with ``pp`` ranks.

    Built once from the schedule rules (:func:`placement`); the trainer, the
    executor, gradient reduction, router balancing and stage building ask it
    (channels and the simulator ask the rules above) instead of comparing
    schedule names.
    """

    schedule: str
    pp: int
    rank: int
    num_stages: int
    chunk_keys: tuple  # (stage, direction) of this rank's chunks, in chunk order
    copies_per_stage: int  # ranks holding each stage's parameters
    directions: int
    mtp: bool  # the model has MTP modules (on the last stage)
    holds_first_stage: bool  # the embedding (and the token input)
    holds_last_stage: bool  # final norm, head, loss and MTP
    embedding_copy: bool  # this schedule's last stage keeps its own copy of the embedding

    def is_first(self, stage: int) -> bool:
        return stage == 0

    def is_last(self, stage: int) -> bool:
        return stage == self.num_stages - 1

    def replica_groups(self, name: str, expert: bool) -> list[str]:
        """The group kinds over which parameter ``name``'s gradient is summed:
        its data-parallel replicas, the other copy of its stage, and, for the
        embedding, the MTP copy on the last stage."""
        kinds = ["expert_dp" if expert else "dp"]
        if self.copies_per_stage > 1:
            kinds.append("stage_copy")
        elif self.embedding_copy and name.startswith("embed."):
            kinds.append("embedding")
        return kinds

    def is_original(self, chunk_key: ChunkKey) -> bool:
        """False for the second copy of a stage (DualPipe's direction 1)."""
        return chunk_key[1] == 0

    def speaks_for(self, chunk_key: ChunkKey, name: str) -> bool:
        """Whether this rank counts ``name`` of chunk ``chunk_key`` in global
        sums such as the gradient norm: the second copy of a stage and the last
        stage's copy of the embedding are counted where the original lives."""
        return self.is_original(chunk_key) and (self.is_first(chunk_key[0]) or not name.startswith("embed."))


def placement(schedule: str, pp: int, rank: int, *, mtp: bool) -> Placement:
    """The Placement of pipeline rank ``rank``; ``mtp``: the model has MTP
    modules (it decides whether the last stage needs its own embedding)."""
    r = rules(schedule)
    stages = stages_of_rank(schedule, pp, rank)
    keys = tuple((s, d if r.mirrored else 0) for d, s in enumerate(stages))
    n = num_model_stages(schedule, pp)
    # A copy of the embedding is needed where a rank holds a last stage but no
    # first stage to share the module with (1F1B, ZB1P with pp > 1).
    split = any(n - 1 in stages_of_rank(schedule, pp, q) and 0 not in stages_of_rank(schedule, pp, q)
                for q in range(pp))
    return Placement(str(schedule), pp, rank, n, keys, r.copies, r.directions, mtp,
                     0 in stages, n - 1 in stages, split and mtp)


def peak_inflight_microbatches(schedule: str, pp: int, num_microbatches: int, pp_rank: int = 0) -> int:
    """Most micro-batches whose activations one pipeline rank holds at once, in
    units of one stage chunk's activations for one micro-batch.

    One chunk per rank (1F1B, ZB1P): rank r warms up with pp - r forwards
    (capped by the number of micro-batches), so rank 0 peaks at pp. DualPipe:
    pp + 1 on every rank, each unit a stage of a pp-stage model (half the
    rank's layers). DualPipeV: 2·pp + 1 on every rank, each unit a stage of the
    2·pp-stage model (again half the rank's layers), i.e. about the
    activations of 1F1B's rank 0. These are the peaks that
    :mod:`mtrain.pipeline.simulate` measures on the schedules.
    """
    r = rules(schedule)
    if r.mirrored:
        return pp + 1
    if r.stages_per_rank == 2:
        return 2 * pp + 1
    return min(num_microbatches, pp - pp_rank)


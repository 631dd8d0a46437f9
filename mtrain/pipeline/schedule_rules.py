"""Facts every schedule user needs without building a schedule: names, argument
rules and which model stages a pipeline rank holds.

Kept apart from the schedule builders so the config validator can use it
before anything heavy is imported.
"""
from __future__ import annotations

SCHEDULE_NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def schedule_errors(schedule: str, pp: int, num_microbatches: int) -> list[str]:
    """Every reason ``schedule`` cannot run with ``pp`` ranks and
    ``num_microbatches`` micro-batches, each naming the fields and the fix."""
    if schedule not in SCHEDULE_NAMES:
        return [
            f"parallel.schedule={schedule!r} is not a known schedule; "
            f"choose one of {', '.join(SCHEDULE_NAMES)}"
        ]
    errors = []
    if pp < 1:
        errors.append(f"parallel.pp={pp} must be at least 1")
    if num_microbatches < 1:
        errors.append(f"parallel.num_microbatches={num_microbatches} must be at least 1")
    if schedule == "dualpipe":
        if pp % 2:
            errors.append(
                f"parallel.schedule=dualpipe needs an even parallel.pp (got pp={pp}): "
                f"use pp={pp + 1} or pp={max(pp - 1, 2)}, or parallel.schedule=dualpipev"
            )
        if num_microbatches % 2:
            errors.append(
                f"parallel.schedule=dualpipe needs an even parallel.num_microbatches "
                f"(got {num_microbatches}): half enter at each end; use {num_microbatches + 1}"
            )
        if num_microbatches < 2 * pp:
            errors.append(
                f"parallel.schedule=dualpipe needs parallel.num_microbatches >= 2*pp = {2 * pp} "
                f"(got {num_microbatches}): raise num_microbatches or lower pp"
            )
    if schedule == "dualpipev" and num_microbatches < 2 * pp:
        errors.append(
            f"parallel.schedule=dualpipev needs parallel.num_microbatches >= 2*pp = {2 * pp} "
            f"(got {num_microbatches}): raise num_microbatches or lower pp"
        )
    return errors


def num_model_stages(schedule: str, pp: int) -> int:
    """How many pieces the model is cut into (DualPipeV cuts it into 2*pp)."""
    return 2 * pp if schedule == "dualpipev" else pp


def stages_of_rank(schedule: str, pp: int, rank: int) -> list[int]:
    """Model stages held by pipeline rank ``rank``, in the order of its chunks.

    DualPipe: stage ``rank`` of the forward direction and stage ``pp-1-rank`` of
    the reverse direction (the same stage indices, so every stage exists twice).
    DualPipeV: stages ``rank`` and ``2*pp-1-rank`` of a 2*pp-stage model.
    """
    if schedule == "dualpipe":
        return [rank, pp - 1 - rank]
    if schedule == "dualpipev":
        return [rank, 2 * pp - 1 - rank]
    return [rank]


def param_copies(schedule: str) -> int:
    """How many ranks hold each stage's parameters."""
    return 2 if schedule == "dualpipe" else 1

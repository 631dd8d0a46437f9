"""Which decoder layers, and which extra pieces, each pipeline model stage holds.

Pure arithmetic: the plan, the memory estimate and the model's split into
stages all read the same answer from here.
"""
from __future__ import annotations

from typing import Optional, Sequence


def _middle_first(num_stages: int) -> list[int]:
    """Stage indices ordered from the middle outwards (lower index first on ties)."""
    center = (num_stages - 1) / 2
    return sorted(range(num_stages), key=lambda i: (abs(i - center), i))


def balanced_layer_counts(num_layers: int, num_stages: int) -> list[int]:
    """Layer counts per stage that differ by at most one.

    When the layers do not divide evenly, the extra layers go to the middle
    stages first: the first stage also runs the embedding and the last one the
    output head, the loss and the MTP modules, so they are left lighter.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be at least 1")
    if num_layers < num_stages:
        raise ValueError(
            f"model.num_layers={num_layers} cannot be split over {num_stages} pipeline stages "
            f"with at least one layer each: lower pp or give parallel.pipeline_layout"
        )
    base, extra = divmod(num_layers, num_stages)
    counts = [base] * num_stages
    for stage in _middle_first(num_stages)[:extra]:
        counts[stage] += 1
    return counts


def check_layout(layout: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    """``layout`` as a list, or ValueError naming parallel.pipeline_layout and the fix."""
    counts = list(layout)
    if len(counts) != num_stages:
        raise ValueError(
            f"parallel.pipeline_layout has {len(counts)} entries but the model is cut into "
            f"{num_stages} stages: give one layer count per stage"
        )
    if any(not isinstance(n, int) or n < 0 for n in counts) or sum(counts) != num_layers:
        raise ValueError(
            f"parallel.pipeline_layout={counts} must be non-negative integer layer counts summing "
            f"to model.num_layers={num_layers} (they sum to {sum(counts)})"
        )
    return counts


def stage_layers(num_layers: int, num_stages: int, layout: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Decoder layer indices of each model stage, in order.

    ``layout`` gives the layer count of every stage (zero allowed, e.g. a stage
    holding only the head); ``None`` balances them with
    :func:`balanced_layer_counts`.
    """
    counts = (
        balanced_layer_counts(num_layers, num_stages)
        if layout is None
        else check_layout(layout, num_layers, num_stages)
    )
    stages, start = [], 0
    for n in counts:
        stages.append(list(range(start, start + n)))
        start += n
    return stages


def stage_roles(num_stages: int, has_mtp: bool = True) -> list[dict]:
    """The non-layer pieces of each stage: the embedding lives on stage 0, the
    final norm, output head and MTP modules (which reuse the head) on the last."""
    last = num_stages - 1
    return [
        {"embedding": i == 0, "head": i == last, "mtp": has_mtp and i == last}
        for i in range(num_stages)
    ]

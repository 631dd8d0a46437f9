"""The rank layout as a pure function: every parallel group from the sizes.

Ranks are laid out over named dimensions, the first in ``order`` varying
fastest (Megatron's convention). Dense layers use the dimensions
``tp, cp, dp, pp``. Expert layers fold their own ``expert_tp, ep, expert_dp``
over the same ranks of a pipeline stage ("parallel folding"): the ranks of one
stage are re-split as expert_tp x ep x expert_dp, in the order given with
``tp`` read as expert_tp and ``dp`` as expert_dp.

Nothing here touches torch.distributed, so layouts for thousands of ranks are
checked in unit tests without processes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

DIMENSIONS = ("tp", "cp", "ep", "dp", "pp")

# Group kinds and the dimensions whose ranks they span.
DENSE_GROUPS = {"tp": ("tp",), "dp": ("dp",), "pp": ("pp",), "mp": ("tp", "pp"), "tp_dp": ("tp", "dp")}
EXPERT_GROUPS = {"ep": ("ep",), "expert_tp": ("tp",), "expert_dp": ("dp",)}


class LayoutError(ValueError):
    """The sizes do not describe a valid layout."""


def parse_order(order: str) -> list[str]:
    dims = order.split("-")
    unknown = [d for d in dims if d not in DIMENSIONS]
    missing = [d for d in ("tp", "dp", "pp") if d not in dims]
    if unknown or missing or len(set(dims)) != len(dims):
        raise LayoutError(
            f"parallel.order={order!r} must list each of tp, dp, pp once (cp and ep "
            f"optional) joined by '-', e.g. 'tp-cp-ep-dp-pp'"
        )
    return dims


def _groups(sizes: list[tuple[str, int]], span: tuple[str, ...]) -> list[list[int]]:
    """Rank groups varying the dimensions in ``span`` with the others fixed.

    ``sizes`` lists (name, size) fastest-varying first.
    """
    strides, stride = {}, 1
    for name, size in sizes:
        strides[name] = stride
        stride *= size
    inner = [(n, s) for n, s in sizes if n in span]
    outer = [(n, s) for n, s in sizes if n not in span]
    groups = []
    for fixed in itertools.product(*(range(s) for _, s in reversed(outer))):
        base = sum(c * strides[n] for (n, _), c in zip(reversed(outer), fixed))
        members = []
        for varied in itertools.product(*(range(s) for _, s in reversed(inner))):
            members.append(base + sum(c * strides[n] for (n, _), c in zip(reversed(inner), varied)))
        groups.append(sorted(members))
    return sorted(groups)


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    ep: int
    expert_tp: int
    pp: int
    dp: int
    expert_dp: int
    order: str
    # Pipeline positions holding copies of the same stages (from the schedule's placement).
    stage_copies: tuple = ()
    # Every group kind -> list of rank lists, each sorted, sorted by first rank.
    groups: dict[str, list[list[int]]] = field(default_factory=dict)

    def group_of(self, kind: str, rank: int) -> list[int]:
        for members in self.groups[kind]:
            if rank in members:
                return members
        raise KeyError(f"rank {rank} is in no {kind} group")

    def pp_rank(self, rank: int) -> int:
        return self.group_of("pp", rank).index(rank)

    def rank_at(self, rank: int, pp_rank: int) -> int:
        """The rank holding pipeline position ``pp_rank`` in ``rank``'s pipeline."""
        return self.group_of("pp", rank)[pp_rank]

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "tp": self.tp,
            "ep": self.ep,
            "expert_tp": self.expert_tp,
            "pp": self.pp,
            "dp": self.dp,
            "expert_dp": self.expert_dp,
            "order": self.order,
            "groups": self.groups,
        }


def ep_hop_groups(ep_groups: list[list[int]], ranks_per_node: int) -> tuple[list[list[int]], list[list[int]]]:
    """The groups of the two-level expert dispatch: each EP group cut into
    nodes of ``ranks_per_node`` consecutive members (``ep_node``), and its
    members of the same index inside their node, one per node (``ep_rail``).
    Both sorted as every group kind is."""
    nodes, rails = [], []
    for members in ep_groups:
        if ranks_per_node < 1 or len(members) % ranks_per_node:
            raise LayoutError(f"{ranks_per_node} EP ranks per node do not divide an EP group of {len(members)}")
        blocks = [members[i:i + ranks_per_node] for i in range(0, len(members), ranks_per_node)]
        nodes += blocks
        rails += [list(rail) for rail in zip(*blocks)]
    return sorted(nodes), sorted(rails)


def layout_errors(world_size: int, tp: int, ep: int, expert_tp: int, pp: int) -> list[str]:
    """Every reason the sizes cannot form a layout, naming the fields and the fix."""
    errors = []
    for name, value in (("tp", tp), ("ep", ep), ("expert_tp", expert_tp), ("pp", pp)):
        if value < 1:
            errors.append(f"parallel.{name}={value} must be at least 1")
    if world_size < 1:
        errors.append(f"world size {world_size} must be at least 1")
    if errors:
        return errors
    if world_size % (tp * pp):
        single = " (one process: parallel=single)" if world_size == 1 else ""
        errors.append(
            f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = "
            f"{tp}*{pp} = {tp * pp}: change tp/pp or the number of ranks{single} "
            f"(cluster.nodes * cluster.gpus_per_node when planning)"
        )
        return errors
    dp = world_size // (tp * pp)
    if (tp * dp) % (ep * expert_tp):
        errors.append(
            f"parallel.ep * parallel.expert_tp = {ep}*{expert_tp} = {ep * expert_tp} must divide "
            f"the {tp * dp} ranks of a pipeline stage (tp * dp = {tp}*{dp}); experts are folded "
            f"over those ranks: pick ep and expert_tp whose product divides {tp * dp}"
        )
    return errors


def build_layout(
    world_size: int,
    tp: int = 1,
    ep: int = 1,
    expert_tp: int = 1,
    pp: int = 1,
    order: str = "tp-cp-ep-dp-pp",
    stage_copies=(),
) -> Layout:
    """Compute every group of the layout. Raises LayoutError naming the problem.

    ``stage_copies``: groups of pipeline positions that hold copies of the same
    stages (DualPipe pairs position r with pp-1-r); each becomes a
    ``stage_copy`` group per pipeline, over which those copies sum gradients."""
    dims = parse_order(order)
    errors = layout_errors(world_size, tp, ep, expert_tp, pp)
    if errors:
        raise LayoutError("; ".join(errors))
    dp = world_size // (tp * pp)
    expert_dp = world_size // (pp * ep * expert_tp)

    dense_sizes = {"tp": tp, "cp": 1, "dp": dp, "pp": pp}
    expert_sizes = {"tp": expert_tp, "cp": 1, "ep": ep, "dp": expert_dp, "pp": pp}
    dense = [(d, dense_sizes[d]) for d in dims if d != "ep"]
    expert = [(d, expert_sizes[d]) for d in dims if d != "cp"]
    if "ep" not in dims:  # ep not named in the order: it varies right after tp
        expert.insert([d for d, _ in expert].index("tp") + 1, ("ep", ep))

    groups = {kind: _groups(dense, span) for kind, span in DENSE_GROUPS.items()}
    groups.update({kind: _groups(expert, span) for kind, span in EXPERT_GROUPS.items()})
    if _groups(expert, ("pp",)) != groups["pp"]:
        raise LayoutError(
            f"parallel.order={order!r} places pp so that expert and dense layers disagree on "
            f"the pipeline stages; put pp last, e.g. 'tp-cp-ep-dp-pp'"
        )

    pipelines = groups["pp"]
    groups["embedding"] = [sorted({p[0], p[-1]}) for p in pipelines]
    copies = tuple(tuple(c) for c in stage_copies)
    if copies:
        groups["stage_copy"] = sorted(sorted(p[i] for i in positions) for p in pipelines for positions in copies)
    return Layout(world_size, tp, ep, expert_tp, pp, dp, expert_dp, order, copies, groups)

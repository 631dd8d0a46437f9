"""Point-to-point channels: one process group per stream of pipeline messages.

NCCL ignores message tags. Between two ranks of one communicator it matches
sends and receives by posting order, and every operation of a communicator runs
on one stream, so a receive posted early also holds back the operations posted
after it. Several messages between the same two ranks are in flight at once in
every schedule here (a forward output and an input gradient; DualPipe's two
directions), so one communicator per pipeline would mismatch or deadlock.

A channel is an *ordered* neighbour pair and a message kind::

    Channel(src, dst, kind)   # pipeline ranks; kind "F" (forward output) or
                              # "B" (input gradient)

Equivalently: the unordered pair, the kind and DualPipe's direction (or
DualPipeV's chunk) -- between two neighbours each kind flows one way per
direction, so the order of ``(src, dst)`` names the direction. Every channel
has one sender and one receiver, and it carries the messages of exactly one
stage link (``F``: stage ``s`` -> ``s+1`` of one direction; ``B``: stage
``s`` -> ``s-1``). Every schedule runs the forwards of
a stage in micro-batch order and the backwards (``B``/``I``) of a stage in
micro-batch order, and the executor posts sends and receives in instruction
order, so within a channel the sender's posting order equals the receiver's:
both are micro-batch order. ``tests/dist/test_p2p_channels.py`` checks this
from the instruction lists of both ranks for every schedule.

This is the minimal set: F and B must stay apart even where they flow the same
way (DualPipe's direction-0 forwards and direction-1 gradients), because their
relative order differs between the two sides (DualPipeV with pp=4: rank 1
sends F and B to rank 2 in an order rank 2 does not receive them in); and the
two ways between a pair must stay apart, or a receive posted ahead would hold
back a send the peer is waiting for.
"""
from __future__ import annotations

import datetime
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from mtrain.pipeline.instructions import backward_dest_rank, forward_dest_rank
from mtrain.pipeline.schedule_rules import num_directions, num_model_stages, stage_rank

MessageKey = tuple  # (kind "F" | "B", stage, microbatch, direction): what ``stage`` sends


class Channel(NamedTuple):
    src: int  # pipeline rank of the sender
    dst: int  # pipeline rank of the receiver
    kind: str  # "F" | "B"


def message_route(schedule: str, pp: int, key: MessageKey) -> Optional[tuple[int, int]]:
    """(sender, receiver) pipeline ranks of message ``key``; None if the stage
    sends nothing of that kind (the last stage's F, the first stage's B)."""
    kind, stage, _, direction = key
    dst_of = forward_dest_rank if kind == "F" else backward_dest_rank
    dst = dst_of(schedule, pp, stage, direction)
    return None if dst is None else (stage_rank(schedule, pp, stage, direction), dst)


def message_channel(schedule: str, pp: int, key: MessageKey) -> Optional[Channel]:
    """The channel carrying ``key``; None when nothing crosses ranks (no message,
    or DualPipeV's local turn from stage ``pp-1`` to ``pp``)."""
    route = message_route(schedule, pp, key)
    if route is None or route[0] == route[1]:
        return None
    return Channel(route[0], route[1], key[0])


def pipeline_channels(schedule: str, pp: int) -> list[Channel]:
    """Every channel one pipeline of ``schedule`` uses, in a fixed order."""
    found = {message_channel(schedule, pp, (kind, stage, 0, direction))
             for kind in "FB" for stage in range(num_model_stages(schedule, pp))
             for direction in range(num_directions(schedule))}
    return sorted(c for c in found if c is not None)


def create_p2p_channels(all_pipelines: Sequence[Sequence[int]], schedule: str, pp: int,
                        timeout: Optional[datetime.timedelta] = None) -> dict[Channel, dist.ProcessGroup]:
    """Create a 2-rank process group per channel of every pipeline and return
    those of this rank's pipeline that hold this rank.

    ``all_pipelines[p][i]`` is the global rank of pipeline rank ``i`` of pipeline
    ``p``. Collective over the world: ``new_group`` must be called by every rank
    for every group in the same order. With NCCL the communicators are
    connected now (``device_id``), in that common order: connected lazily, the
    first messages of two channels could each wait for the other's connection.
    """
    rank = dist.get_rank()
    device_id = None
    if "nccl" in str(dist.get_backend()):
        device_id = torch.device("cuda", torch.cuda.current_device())
    channels = pipeline_channels(schedule, pp)
    mine: dict[Channel, dist.ProcessGroup] = {}
    for ranks in sorted(list(p) for p in all_pipelines):
        if len(ranks) != pp:
            raise ValueError(f"pipeline {ranks} has {len(ranks)} ranks, expected pp={pp}")
        for channel in channels:
            pair = [ranks[channel.src], ranks[channel.dst]]
            group = dist.new_group(pair, timeout=timeout, device_id=device_id)
            if rank in pair:
                mine[channel] = group
    return mine


def gather_pipelines(pp_group_ranks: Sequence[int]) -> list[list[int]]:
    """Every pipeline of the job, from each rank's own (collective over the world)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(pp_group_ranks))
    return sorted({tuple(ranks) for ranks in everyone})

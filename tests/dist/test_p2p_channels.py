"""Point-to-point channels: message order per channel, and the executor with
messages matched by channel and posting order alone (tag 0), as NCCL does.

The orders are derived from the instruction lists of both ranks the way the
executor posts: sends after each instruction's compute, in instruction order
(an overlapped pair sends its F output, then its B gradient); receives for
instruction ``i+1`` before instruction ``i`` runs, i.e. also in instruction order.
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

from mtrain.runtime.comm import AllToAllOp, IdentityOp
from mtrain.pipeline.channels import Channel, create_p2p_channels, message_channel, pipeline_channels
from mtrain.pipeline.executor import PipelineExecutor, expected_chunk_keys
from mtrain.pipeline.instructions import (FORWARD, backward_dest_rank, backward_source_rank, forward_dest_rank,
                                          forward_source_rank)
from mtrain.pipeline.schedule_rules import num_model_stages, placement, schedule_errors
from mtrain.pipeline.schedules import build_schedule
from mtrain.testing import run_distributed
from tests.dist.test_executor import ATOL, MBS, RTOL, SCHEDULES, _grads, make_batches, make_chunk, reference


def _cases():
    for schedule in SCHEDULES:
        for pp in (2, 4, 8):
            for n in sorted({3, pp, 2 * pp, 2 * pp + 2, 3 * pp}):
                if not schedule_errors(schedule, pp, n):
                    yield schedule, pp, n


def _posting_orders(schedule: str, pp: int, n: int):
    """Per (sender, receiver) pipeline-rank pair: the keys in the order the
    sender posts them and in the order the receiver posts their receives.
    Local hand-offs (sender == receiver) are left out."""
    sent, received = defaultdict(list), defaultdict(list)
    for rank in range(pp):
        for ins in build_schedule(schedule, pp, n, rank):
            for op in ins.ops:
                if op.kind == "W":
                    continue
                forward = op.kind == FORWARD
                dst = (forward_dest_rank if forward else backward_dest_rank)(schedule, pp, op.stage, op.direction)
                if dst is not None and dst != rank:
                    sent[rank, dst].append(("F" if forward else "B", op.stage, op.microbatch, op.direction))
                src = (forward_source_rank if forward else backward_source_rank)(schedule, pp, op.stage, op.direction)
                if src is not None and src != rank:
                    stage = op.stage - 1 if forward else op.stage + 1
                    received[src, rank].append(("F" if forward else "B", stage, op.microbatch, op.direction))
    return sent, received


@pytest.mark.parametrize("schedule,pp,n", list(_cases()))
def test_every_channel_has_one_order_on_both_sides(schedule, pp, n):
    sent, received = _posting_orders(schedule, pp, n)
    per_channel_sent, per_channel_received = defaultdict(list), defaultdict(list)
    for (src, dst), keys in sent.items():
        for key in keys:
            channel = message_channel(schedule, pp, key)
            assert channel == Channel(src, dst, key[0]), (key, channel)
            per_channel_sent[channel].append(key)
    for (src, dst), keys in received.items():
        for key in keys:
            assert message_channel(schedule, pp, key) == Channel(src, dst, key[0]), key
            per_channel_received[Channel(src, dst, key[0])].append(key)
    channels = pipeline_channels(schedule, pp)
    # Exactly the channels used, each neighbouring pair, kind and direction once.
    assert sorted(per_channel_sent) == sorted(per_channel_received) == channels
    assert all(abs(c.src - c.dst) == 1 for c in channels)
    assert len(channels) == (2 if schedule in ("1f1b", "zb1p") else 4) * (pp - 1)
    for channel in channels:
        assert per_channel_sent[channel] == per_channel_received[channel], channel
        microbatches = [key[2] for key in per_channel_sent[channel]]
        assert microbatches == sorted(microbatches), channel
        stages = {(key[1], key[3]) for key in per_channel_sent[channel]}
        assert len(stages) == 1, f"{channel} carries several stage links: {stages}"


def test_one_channel_per_rank_pair_would_mismatch():
    """Why F and B get separate channels: DualPipeV with pp=4 sends F and B
    from rank 1 to rank 2 in an order rank 2 does not receive them in."""
    sent, received = _posting_orders("dualpipev", 4, 8)
    assert {key[0] for key in sent[1, 2]} == {"F", "B"}
    assert sent[1, 2] != received[1, 2]


def test_message_channel_of_local_and_missing_messages():
    assert message_channel("dualpipev", 4, ("F", 3, 0, 0)) is None  # rank 3 turns from stage 3 to 4
    assert message_channel("dualpipev", 4, ("B", 4, 0, 0)) is None
    assert message_channel("1f1b", 4, ("F", 3, 0, 0)) is None  # the loss
    assert message_channel("1f1b", 4, ("B", 0, 0, 0)) is None
    assert message_channel("dualpipe", 4, ("F", 0, 5, 1)) == Channel(3, 2, "F")
    assert message_channel("dualpipev", 4, ("B", 6, 0, 0)) == Channel(1, 2, "B")  # stage 6 on rank 1


def _worker(schedule: str, pp: int, n: int, pipelines: int) -> dict:
    rank = dist.get_rank()
    pipeline, pp_rank = divmod(rank, pp)
    all_pipelines = [[p * pp + i for i in range(pp)] for p in range(pipelines)]
    channels = create_p2p_channels(all_pipelines, schedule, pp)
    mine = {c for c in pipeline_channels(schedule, pp) if pp_rank in (c.src, c.dst)}
    assert set(channels) == mine
    for c, group in channels.items():
        pair = [all_pipelines[pipeline][c.src], all_pipelines[pipeline][c.dst]]
        assert dist.get_process_group_ranks(group) == sorted(pair)
    comm_op = IdentityOp
    if pipelines == 2:  # mirror ranks swap half their rows, as in tests/dist/test_executor.py
        ep_groups = [dist.new_group([r, pp + r]) for r in range(pp)]
        half = MBS // 2
        comm_op = lambda: AllToAllOp([half, half], [half, half], ep_groups[pp_rank])  # noqa: E731
    chunks = {key: make_chunk(key[0], num_model_stages(schedule, pp), comm_op)
              for key in expected_chunk_keys(schedule, pp, pp_rank)}
    executor = PipelineExecutor(schedule, pp, pp_rank, n, chunks, all_pipelines[pipeline],
                                channels=channels, p2p_tags=False)
    result = executor.step(make_batches(pipeline, n))
    return {"pipeline": pipeline, "losses": result.losses, "grads": {key: _grads(c) for key, c in chunks.items()}}


def _check_untagged(schedule: str, pp: int, n: int, pipelines: int) -> None:
    results = run_distributed(_worker, pipelines * pp, schedule, pp, n, pipelines, timeout=60)
    ref_losses, ref_grads = reference(schedule, pp, n, pipelines)
    for p in range(pipelines):
        mine = [r for r in results if r["pipeline"] == p]
        losses = {m: loss for r in mine for m, loss in r["losses"].items()}
        assert sorted(losses) == list(range(n))
        torch.testing.assert_close(torch.tensor([losses[m] for m in range(n)]), torch.tensor(ref_losses[p]),
                                   rtol=RTOL, atol=ATOL)
        for s, ref in enumerate(ref_grads[p]):
            copies = [r["grads"][key] for r in mine for key in r["grads"] if key[0] == s]
            assert len(copies) == placement(schedule, pp, 0, mtp=False).copies_per_stage
            for name, g in ref.items():
                torch.testing.assert_close(sum(c[name] for c in copies), g, rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"pipeline {p} stage {s} {name}: {m}")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp4_untagged_matches_reference(schedule):
    _check_untagged(schedule, pp=4, n=8, pipelines=1)


def test_pp2_two_pipelines_untagged_matches_reference():
    _check_untagged("dualpipe", pp=2, n=4, pipelines=2)

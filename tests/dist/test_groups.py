import pytest
import torch
import torch.distributed as dist

from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.schedule_rules import copy_groups
from mtrain.testing import RankFailure, RankTimeout, run_distributed


def _allreduce_every_group(layout):
    groups = create_groups(layout, timeout_s=30)
    rank = dist.get_rank()
    sums = {}
    for kind in layout.groups:
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=groups.group(kind))
        sums[kind] = t.item()
    return sums


@pytest.mark.parametrize("sizes", [dict(tp=2, ep=4, pp=1), dict(tp=2, ep=2, pp=2, stage_copies=copy_groups("dualpipe", 2)),
                                   dict(tp=1, ep=2, expert_tp=2, pp=2)])
def test_allreduce_sums_group_members(sizes):
    layout = build_layout(8, **sizes)
    results = run_distributed(_allreduce_every_group, 8, layout, timeout=60)
    for rank, sums in enumerate(results):
        for kind, total in sums.items():
            assert total == sum(layout.group_of(kind, rank)), (kind, rank)


def _fail_on_rank_2():
    if dist.get_rank() == 2:
        raise ValueError("boom on purpose")
    dist.barrier()


def test_failure_names_the_rank_and_traceback():
    with pytest.raises(RankFailure, match=r"rank 2[\s\S]*ValueError: boom on purpose"):
        run_distributed(_fail_on_rank_2, 4, timeout=30)


def _hang_on_rank_1():
    import time
    if dist.get_rank() == 1:
        time.sleep(60)
    return dist.get_rank()


def test_hang_times_out_naming_the_rank():
    with pytest.raises(RankTimeout, match=r"ranks \[1\][\s\S]*_hang_on_rank_1"):
        run_distributed(_hang_on_rank_1, 3, timeout=4)


def _all_to_all_uneven():
    rank, world = dist.get_rank(), dist.get_world_size()
    # rank r sends (r + j + 1) values to rank j: uneven splits, as MoE dispatch needs.
    send_splits = [rank + j + 1 for j in range(world)]
    recv_splits = [j + rank + 1 for j in range(world)]
    send = torch.cat([torch.full((n,), float(rank * 10 + j)) for j, n in enumerate(send_splits)])
    recv = torch.empty(sum(recv_splits))
    dist.all_to_all_single(recv, send, recv_splits, send_splits)
    return recv.tolist()


def test_results_return_by_rank_uneven_all_to_all():
    results = run_distributed(_all_to_all_uneven, 4, timeout=30)
    for rank, got in enumerate(results):
        expected = [float(j * 10 + rank) for j in range(4) for _ in range(j + rank + 1)]
        assert got == expected

"""Expert tensor parallelism: each expert's ffn dimension split over ``expert_tp``.

After the EP dispatch every rank of an expert_tp group holds its own rows for
the same local experts. The experts step gathers the rows of the whole group
(uneven counts per rank), runs the grouped GEMM on this rank's ffn shard
(SwiGLU is elementwise, so the shard is exact up to the down projection, which
yields partial sums) and reduce-scatters the partial sums so each rank gets
back its own rows, complete. Gather and reduce-scatter are each other's
gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mtrain.model.fp8 import fp8_rows
from mtrain.model.moe.dispatch import expert_major_index


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, pad])


def all_gather_rows(x: torch.Tensor, rows_per_rank: list[int], group) -> torch.Tensor:
    """Concatenate every rank's ``x`` (``rows_per_rank[j]`` rows on rank j) in rank order.
    Pieces are padded to the largest count: collectives need equal sizes."""
    most = max(rows_per_rank)
    pieces = [x.new_empty((most,) + tuple(x.shape[1:])) for _ in rows_per_rank]
    dist.all_gather(pieces, _padded(x, most), group=group)
    return torch.cat([p[:n] for p, n in zip(pieces, rows_per_rank)])


def reduce_scatter_rows(x: torch.Tensor, rows_per_rank: list[int], group) -> torch.Tensor:
    """Sum ``x`` (every rank's rows in rank order) over the group; keep this rank's rows."""
    rank = dist.get_rank(group)
    start = sum(rows_per_rank[:rank])
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: all-reduce the whole tensor, keep our slice.
        full = x.contiguous().clone()
        dist.all_reduce(full, group=group)
        return full[start:start + rows_per_rank[rank]]
    most = max(rows_per_rank)
    pieces, offset = [], 0
    for n in rows_per_rank:
        pieces.append(_padded(x[offset:offset + n], most))
        offset += n
    out = x.new_empty((most,) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, torch.cat(pieces), group=group)
    return out[:rows_per_rank[rank]]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows_per_rank, group):
        ctx.rows_per_rank, ctx.group = rows_per_rank, group
        return all_gather_rows(x, rows_per_rank, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad, ctx.rows_per_rank, ctx.group), None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows_per_rank, group):
        ctx.rows_per_rank, ctx.group = rows_per_rank, group
        return reduce_scatter_rows(x, rows_per_rank, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_rows(grad, ctx.rows_per_rank, ctx.group), None, None


def gather_rows(x: torch.Tensor, rows_per_rank: list[int], group) -> torch.Tensor:
    """Differentiable :func:`all_gather_rows` (its gradient is the reduce-scatter)."""
    return _GatherRows.apply(x, rows_per_rank, group)


def scatter_rows(x: torch.Tensor, rows_per_rank: list[int], group) -> torch.Tensor:
    """Differentiable :func:`reduce_scatter_rows` (its gradient is the all-gather)."""
    return _ReduceScatterRows.apply(x, rows_per_rank, group)


def group_counts(tokens_per_expert: list[int], group, device) -> tuple[torch.Tensor, list[list[int]]]:
    """[expert_tp, local experts]: every rank's received rows per local expert,
    on the device and (one host read) as lists."""
    mine = torch.tensor(tokens_per_expert, dtype=torch.long, device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    counts = torch.stack(counts)
    return counts, counts.tolist()


def _gather_tiles(tiles: tuple, rows_per_rank: list[int], group, order: torch.Tensor) -> tuple:
    """The FP8 tiles (data, scales) of every rank's rows, in ``order``; their
    bytes travel as uint8 (collectives need not know the fp8 dtype)."""
    data, scales = tiles
    data = all_gather_rows(data.view(torch.uint8), rows_per_rank, group).view(data.dtype)
    scales = all_gather_rows(scales, rows_per_rank, group)
    return fp8_rows(data, order), scales.index_select(0, order)


def run_split_experts(experts, grouped: torch.Tensor, counts: tuple[torch.Tensor, list[list[int]]],
                      group, tiles: tuple | None = None) -> torch.Tensor:
    """``experts`` (this rank's ffn shard) on the rows of the whole expert_tp group.

    ``grouped``: this rank's rows, expert-major; ``counts``: :func:`group_counts`;
    ``tiles``: their FP8 tiles from an FP8 dispatch (gathered alike).
    Returns this rank's rows of the full expert output, in the same order.
    """
    device_counts, host = counts
    rows_per_rank = [sum(row) for row in host]
    gathered = gather_rows(grouped, rows_per_rank, group)  # (rank, expert)
    order = expert_major_index(device_counts, sum(rows_per_rank))  # -> (expert, rank): one block per expert
    if tiles is not None:
        tiles = _gather_tiles(tiles, rows_per_rank, group, order)
    per_expert = [sum(col) for col in zip(*host)]
    partial = experts(gathered.index_select(0, order), per_expert, tiles)
    partial = partial.index_select(0, torch.argsort(order))
    return scatter_rows(partial, rows_per_rank, group)

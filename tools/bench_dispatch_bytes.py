#!/usr/bin/env python
"""Bytes the MoE dispatch sends per token: DeepSeek-V3's token-level scheme
(each token once per destination rank, its gates alongside) against one row
per (token, selected expert), for top-k in {2, 4, 8}.

  python tools/bench_dispatch_bytes.py                      # V3 shapes: 256 experts, hidden 7168, EP64 on 8 nodes
  python tools/bench_dispatch_bytes.py --experts 64 --ep 8 --gpus-per-node 4
  python tools/bench_dispatch_bytes.py --experts 64 --ep 8 --gpus-per-node 4 --measure   # + the built plans

Routing is mtrain's own (``select_experts``: sigmoid scores of random
tokens, group-limited as configured, V3's 8 groups keeping 4 by default), so
the destination counts are those the router produces, not an assumption.
Only what leaves a rank is counted (rows for the rank itself stay in
memory). Per token, in the dispatch direction (the combine returns the same
number of rows without gates or ids):

- ``per expert row``: one bf16 hidden row for every selected expert on
  another rank;
- ``per rank``: one row (hidden + k gates, bf16) per other destination rank,
  plus its k int32 local expert ids (the alltoall backend sends them in the
  plan; DeepEP sends its own int64 ids);
- ``per rank, FP8``: the same rows with the hidden state as E4M3 (1 byte per
  channel) plus one fp32 scale per 128 channels (``train.fp8=blockwise``, the
  payload of :mod:`mtrain.model.moe.fp8_dispatch`; the gates stay bf16);
- ``rows crossing nodes``: how many of those rows leave the node, per token,
  for each scheme, and the number of distinct other nodes (what a two-level
  exchange, once per node then forwarded over NVLink, sends).

``--measure`` also builds the alltoall dispatcher's plans, one- and
two-level, on ``--ep`` gloo processes (CPU; each routes its own random
tokens) and prints the rows they send across nodes per token, averaged over
the ranks: what the exchanges would move, read from their split sizes.
"""
from __future__ import annotations

import argparse

import torch

from mtrain.model.moe.fp8_dispatch import payload_row_bytes
from mtrain.model.moe.router import select_experts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ep", type=int, default=64)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--n-group", type=int, default=8)
    p.add_argument("--topk-group", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--topk", default="2,4,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", action="store_true", help="also build the dispatcher's plans on --ep gloo processes")
    return p.parse_args(argv)


def destinations(idx: torch.Tensor, experts_per_rank: int, ranks_per_node: int, source_rank: int):
    """Per token: selected experts on other ranks, other ranks, and other nodes reached."""
    rank = idx // experts_per_rank
    node = rank // ranks_per_node
    other_rows = (rank != source_rank).sum(1)
    ranks = torch.zeros(idx.shape[0], int(rank.max()) + 1, dtype=torch.bool).scatter_(1, rank, True)
    ranks[:, source_rank] = False
    nodes = torch.zeros(idx.shape[0], int(node.max()) + 1, dtype=torch.bool).scatter_(1, node, True)
    own_node = source_rank // ranks_per_node
    rows_off_node = (node != own_node).sum(1)
    rank_ids = torch.arange(ranks.shape[1])
    ranks_off_node = (ranks & (rank_ids // ranks_per_node != own_node)).sum(1)
    nodes[:, own_node] = False
    return other_rows.float(), ranks.sum(1).float(), rows_off_node.float(), ranks_off_node.float(), nodes.sum(1).float()


def _measure_rank(args, topks: list[int]) -> list[tuple[float, float]]:
    """On one of ``--ep`` ranks: rows this rank's one- and two-level plans send
    across nodes, per token, for each top-k."""
    import torch.distributed as dist

    from mtrain.model.moe.dispatch import Dispatcher
    from mtrain.parallel.layout import ep_hop_groups

    rank, ep = dist.get_rank(), dist.get_world_size()
    per_node = min(ep, args.gpus_per_node)
    group = dist.new_group(list(range(ep)))
    nodes, rails = ep_hop_groups([list(range(ep))], per_node)
    hop_groups = tuple(dist.new_subgroups_by_enumeration(kind)[0] for kind in (nodes, rails))
    one, two = Dispatcher(args.experts, group), Dispatcher(args.experts, group, hop_groups)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    node, out = rank // per_node, []
    for k in topks:
        scores = torch.randn(args.tokens, args.experts, generator=gen).sigmoid()
        idx = select_experts(scores, torch.zeros(args.experts), k, args.n_group, args.topk_group)
        sent = one.plan(idx).dispatch_op.send_splits
        rail = two.plan(idx).dispatch_op.first.send_splits
        one_level = sum(rows for r, rows in enumerate(sent) if r // per_node != node)
        out.append((one_level / args.tokens, (sum(rail) - rail[node]) / args.tokens))
    return out


def measure(args, topks: list[int]) -> None:
    from mtrain.testing import run_distributed

    results = run_distributed(_measure_rank, args.ep, args, topks, timeout=600)
    print(f"\nBuilt plans (alltoall dispatcher, {args.ep} gloo ranks): rows crossing nodes per token, "
          f"mean over ranks\n")
    print("| top-k | one-level (per rank) | two-level (per node) |")
    print("|---:|---:|---:|")
    for i, k in enumerate(topks):
        one = sum(r[i][0] for r in results) / len(results)
        two = sum(r[i][1] for r in results) / len(results)
        print(f"| {k} | {one:.2f} | {two:.2f} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    per_rank, per_node = args.experts // args.ep, min(args.ep, args.gpus_per_node)
    print(f"{args.experts} experts over EP{args.ep} ({per_rank} per rank, {per_node} ranks per node), "
          f"hidden {args.hidden} in bf16, groups {args.n_group} keep {args.topk_group}, "
          f"{args.tokens} random tokens from rank 0\n")
    print("| top-k | per expert row (KiB/token) | per rank (KiB/token) | ratio | per rank, FP8 (KiB/token) "
          "| FP8 / bf16 | other ranks/token | rows crossing nodes: per expert row / per rank / two-level (per node) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    topks = [int(v) for v in args.topk.split(",")]
    for k in topks:
        scores = torch.randn(args.tokens, args.experts, generator=gen).sigmoid()
        idx = select_experts(scores, torch.zeros(args.experts), k, args.n_group, args.topk_group)
        rows, ranks, rows_off, ranks_off, nodes = destinations(idx, per_rank, per_node, source_rank=0)
        row_bytes = args.hidden * 2
        per_row = rows.mean() * row_bytes
        token_level = ranks.mean() * (payload_row_bytes(args.hidden, k, torch.bfloat16, False) + k * 4)
        fp8_level = ranks.mean() * (payload_row_bytes(args.hidden, k, torch.bfloat16, True) + k * 4)
        print(f"| {k} | {per_row / 1024:.1f} | {token_level / 1024:.1f} | {per_row / token_level:.2f}x "
              f"| {fp8_level / 1024:.1f} | {fp8_level / token_level:.3f} | {ranks.mean():.2f} | {rows_off.mean():.2f} / {ranks_off.mean():.2f} / {nodes.mean():.2f} |")
    if args.measure:
        measure(args, topks)


if __name__ == "__main__":
    main()

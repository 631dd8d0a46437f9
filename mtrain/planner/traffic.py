"""Expert-parallel traffic per token: how many nodes and GPUs a token is sent
to under the model's routing (group- and node-limited), and so how many
copies cross InfiniBand and NVLink in the token-level exchange
(mtrain/model/moe/dispatch.py).

The routing is the model's own (:func:`mtrain.model.moe.router.select_experts`)
applied to random affinities, i.e. balanced load: the expected sends are the
mean over a fixed sample of tokens, each sent from a different GPU. Node- and
group-limited routing choose nodes for their best experts, so a chosen node
nearly always receives one; a uniform choice of experts inside the chosen
nodes would understate the traffic (DeepSeek-V3, EP64 over 8 nodes: 3.46
other nodes per token against 3.18).

Sends of one token from a GPU (never to itself):

- one hop: once to every other GPU holding one of its experts; those on
  other nodes cross InfiniBand, the others NVLink;
- two hops (V3, DeepEP): once over InfiniBand to every other node holding
  one (to the GPU of the sender's local index), then over NVLink to every
  other GPU of that node holding one; in its own node straight over NVLink.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from mtrain.model.moe.router import select_experts

SAMPLE_TOKENS = 4096
SEED = 1234


@dataclass(frozen=True)
class Destinations:
    """Expected sends of one token (from one GPU) per exchange."""

    remote_nodes: float  # nodes other than the sender's holding one of its experts
    remote_gpus: float  # GPUs other than the sender holding one
    ib_sends: float  # copies of the token crossing InfiniBand
    nvlink_sends: float  # copies crossing NVLink


def count_sends(expert_ids: torch.Tensor, senders: torch.Tensor, num_experts: int, ep: int, ep_per_node: int,
                hops: int) -> Destinations:
    """Mean sends per token of the routing ``expert_ids`` [T, k], token ``t``
    sent from GPU ``senders[t]`` of the EP group."""
    if ep < 1 or ep % ep_per_node or num_experts % ep:
        raise ValueError(f"ep={ep} must be a multiple of ep_per_node={ep_per_node} and divide "
                         f"num_experts={num_experts}")
    if hops not in (1, 2):
        raise ValueError(f"hops must be 1 or 2, got {hops}")
    tokens = expert_ids.shape[0]
    hit = torch.zeros(tokens, ep, dtype=torch.bool)
    hit.scatter_(1, expert_ids // (num_experts // ep), True)
    gpu = torch.arange(ep)
    node, local = gpu // ep_per_node, gpu % ep_per_node
    own_node = node[None, :] == (senders // ep_per_node)[:, None]
    self_ = gpu[None, :] == senders[:, None]
    others = hit & ~self_
    nodes_hit = torch.zeros(tokens, ep // ep_per_node, dtype=torch.bool)
    nodes_hit.scatter_(1, (expert_ids // (num_experts // ep)) // ep_per_node, True)
    remote_nodes = nodes_hit.sum(1) - nodes_hit.gather(1, (senders // ep_per_node)[:, None]).squeeze(1).long()
    if hops == 1 or ep == ep_per_node:
        ib, nvlink = (others & ~own_node).sum(1), (others & own_node).sum(1)
    else:
        landing = local[None, :] == (senders % ep_per_node)[:, None]  # where a token enters each node
        ib, nvlink = remote_nodes, (hit & ~landing).sum(1)
    mean = lambda x: float(x.float().mean())  # noqa: E731
    return Destinations(mean(remote_nodes), mean(others.sum(1)), mean(ib), mean(nvlink))


@lru_cache(maxsize=256)
def destinations(num_experts: int, topk: int, n_group: int, topk_group: int, group_score: str, ep: int,
                 ep_per_node: int, max_nodes: int, hops: int) -> Destinations:
    """Expected sends of one token under the model's routing of random
    affinities (a fixed sample, so the same figures every time)."""
    gen = torch.Generator().manual_seed(SEED)
    scores = torch.rand(SAMPLE_TOKENS, num_experts, generator=gen)
    nodes = ep // ep_per_node
    ids = select_experts(scores, torch.zeros(num_experts), topk, n_group, topk_group, group_score, nodes,
                         max_nodes)
    senders = torch.arange(SAMPLE_TOKENS) % ep
    return count_sends(ids, senders, num_experts, ep, ep_per_node, hops)


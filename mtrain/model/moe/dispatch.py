"""Moving tokens to their experts and back, once per destination rank.

A token routed to k experts is sent at most once to each EP rank that holds
one of them (DeepSeek-V3's dispatch), not once per expert: its hidden state
travels with its k gates, the receiver expands it to one row per expert it
holds, and sums the gated expert outputs back to one row before the return
trip. When the EP group spans several nodes the alltoall backend can cross
the network once per destination *node* instead (DeepSeek-V3's and DeepEP's
internode form): to the rank of the same index inside that node, which
forwards the token inside its node to the ranks holding its experts.

A dispatcher cuts the routed half of an MoE layer at its two
communication points. The local steps (``pack``, ``expand``, ``reduce``,
``unpack``) are ordinary autograd computations; the communication steps are
:class:`~mtrain.runtime.comm.CommOp` objects in the plan, which the MoE layer's
program exchanges (synchronously in a plain forward, overlapped with another
micro-batch's compute in the pipeline runtime).

Backends register themselves here (:func:`register_dispatcher`): ``local``
(ep=1, no communication) and ``alltoall`` (torch.distributed
``all_to_all_single`` with uneven splits, counts exchanged first; one or two
levels; gloo and nccl) in this module, ``deepep`` (``deep_ep.Buffer``, GPU only) in
:mod:`mtrain.model.moe.deepep`. With ``fp8`` (``train.fp8=blockwise``) the
dispatch carries the hidden states as FP8 tiles, and the combine's backward
the output gradient (:mod:`mtrain.model.moe.fp8_dispatch`); the combine
and the dispatch's backward do not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mtrain.model.moe.fp8_dispatch import FP8GradientOp, FP8PayloadOp
from mtrain.runtime.comm import AllToAllOp, CommOp, IdentityOp, TransposedOp, TwoHopOp


@dataclass
class DispatchPlan:
    """How the tokens of one micro-batch reach their experts and come back.

    The source sends each token once to every EP rank holding at least one of
    its selected experts: one *pair* (token, destination rank) per such rank,
    the token's hidden state with its top-k gates appended. The receiver knows
    which of the k slots are its own (``recv_ids``: local expert id, or -1 for
    a slot served elsewhere), expands each received token to one row per own
    slot, expert-major (``row_token``, ``row_slot``), runs the experts, and
    sums each token's gated rows back to one row before the return trip; the
    source adds up what the ranks return (``pair_token``).

    In the two-level exchange the pairs are (token, destination node), and the
    dispatch op forwards each token inside the destination node before it
    reaches the receiver (:class:`~mtrain.runtime.comm.TwoHopOp`); the
    receiver's side is the same.
    """

    topk: int
    num_tokens: int  # tokens this rank routes (the source side)
    dispatch_op: CommOp
    combine_op: CommOp
    # Source side: the token of every sent pair, rank-major (node-major in the two-level
    # exchange; None: the exchange returns one row per token).
    pair_token: Optional[torch.Tensor] = None
    # Receiver side, filled once the received tokens are known (after the dispatch for DeepEP).
    recv_ids: Optional[torch.Tensor] = None  # [N, k] local expert per slot, -1 where another rank serves it
    row_token: Optional[torch.Tensor] = None  # [R] received token of each expert-major row
    row_slot: Optional[torch.Tensor] = None  # [R] its slot, as an index into the flattened [N, k] gates
    tokens_per_expert: list[int] = field(default_factory=list)
    # [expert_tp, local experts] received rows of every expert_tp rank (expert_tp > 1),
    # on the device and as host lists; exchanged once per plan so recomputation does not repeat it.
    expert_tp_counts: Optional[tuple] = None
    # FP8 dispatch: (fp8 data [N, H], fp32 1x128 scales [N, H / 128]) of the received tokens.
    received_tiles: Optional[tuple] = None

    def expand_received(self, recv_ids: torch.Tensor, num_local: int, tokens_per_expert: list[int]) -> None:
        """Set the receiver side from the received slots' local expert ids."""
        self.recv_ids, self.tokens_per_expert = recv_ids, tokens_per_expert
        self.row_token, self.row_slot = expert_major_rows(recv_ids, num_local, sum(tokens_per_expert))


def count_per_expert(flat_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``flat_idx`` name each expert, on the device.
    (``bincount`` would read the maximum back to the host first.)"""
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_idx.device)
    return counts.index_add_(0, flat_idx, torch.ones_like(flat_idx))


def expert_major_rows(ids: torch.Tensor, num_local: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, flat slot)`` of every (token, own slot) row of ``ids`` [N, k]
    (local expert ids, -1: not here), ordered by expert, then token, then
    slot. ``rows``, the number of own slots, is known on the host, so nothing
    is read back."""
    flat = ids.flatten().long()
    key = torch.where(flat >= 0, flat, num_local)  # foreign slots sort last and are cut off
    order = torch.argsort(key, stable=True)[:rows]
    return order // ids.shape[1], order


def expert_major_index(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Rows arrive ordered (source rank, local expert); this index lists them
    expert-major, i.e. (local expert, source rank). ``counts`` is [sources,
    experts] on the device, ``total`` its sum, known on the host (so the
    index is built without reading anything back)."""
    flat = counts.flatten()
    starts = (torch.cumsum(flat, 0) - flat).view(counts.shape)
    lengths, block_starts = counts.t().flatten(), starts.t().flatten()  # blocks in (expert, source) order
    # Row j of block b is block_starts[b] + (j - where block b begins in the output).
    out_starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.repeat_interleave(block_starts - out_starts, lengths, output_size=total)
    return offset + torch.arange(total, device=counts.device)


class _GatedSum(torch.autograd.Function):
    """``sum[token] += gate[r] * out[r]`` over rows r, keeping only ``out`` and
    the gates for the backward (not the gated rows), and computing the gate
    gradients as row dot products, so the backward holds one [R, H] buffer
    (the rows' gradient, scaled in place) where plain ops would hold three."""

    @staticmethod
    def forward(ctx, out, gates, row_token, num_tokens):
        ctx.save_for_backward(out, gates, row_token)
        return out.new_zeros(num_tokens, out.shape[1]).index_add_(0, row_token, out * gates)

    @staticmethod
    def backward(ctx, grad):
        out, gates, row_token = ctx.saved_tensors
        rows = grad.index_select(0, row_token)
        grad_gates = torch.bmm(rows.unsqueeze(1), out.unsqueeze(2)).view_as(gates) if ctx.needs_input_grad[1] else None
        return rows.mul_(gates) if ctx.needs_input_grad[0] else None, grad_gates, None, None


class Dispatcher:
    """The alltoall backend; with ``ep_group`` None (or of size 1) it is the
    local backend: the same bookkeeping with no communication.

    The routed path: ``pack`` (source: tokens with their gates, one row per
    destination pair) | dispatch | ``expand`` (receiver: one row per own slot,
    expert-major, and their gates) | experts | ``reduce`` (receiver: gated rows
    summed per token) | combine | ``unpack`` (source: one row per token).

    ``hop_groups`` (node group, rail group) makes the exchange two-level: the
    EP group is cut into nodes of consecutive EP ranks; the node group holds
    this rank's node, the rail group the ranks of this rank's index inside
    their node, one per node (both in EP order).

    ``fp8``: the dispatch sends the hidden states as FP8 1x128 tiles with their
    scales (:class:`~mtrain.model.moe.fp8_dispatch.FP8PayloadOp`), and the
    combine's backward sends the output gradient so
    (:class:`~mtrain.model.moe.fp8_dispatch.FP8GradientOp`), also at ep=1, so
    every EP size computes the same; ``fp8_on_wire=False`` quantizes on
    arrival instead (the same numbers, high-precision bytes on the wire).
    """

    name = "alltoall"

    def __init__(self, num_experts: int, ep_group=None, hop_groups: Optional[tuple] = None, fp8: bool = False):
        self.num_experts = num_experts
        self.fp8, self.fp8_on_wire = fp8, True
        self.group = ep_group
        self.ep = 1 if ep_group is None else dist.get_world_size(ep_group)
        if self.ep == 1:
            self.name, hop_groups = "local", None
        self.num_local = num_experts // self.ep
        self.node_group, self.rail_group = hop_groups or (None, None)
        if hop_groups is not None:
            self.node_size, self.nodes = dist.get_world_size(self.node_group), dist.get_world_size(self.rail_group)
            self.node, self.rail = dist.get_rank(self.rail_group), dist.get_rank(self.node_group)
            me = self.node * self.node_size + self.rail
            if self.node_size * self.nodes != self.ep or dist.get_rank(ep_group) != me:
                raise ValueError(f"node groups of {self.node_size} and rail groups of {self.nodes} ranks do not cut "
                                 f"the EP group of {self.ep} into nodes of consecutive ranks")

    def plan(self, topk_idx: torch.Tensor) -> DispatchPlan:
        """One host sync: the pair and row counts the exchange and the grouped
        GEMM need, read back once (after the counts' all-to-all when ep > 1,
        their all_gather in two levels)."""
        plan = self._plan(topk_idx)
        if self.fp8:
            plan.dispatch_op = FP8PayloadOp(plan.dispatch_op, plan, self.fp8_on_wire)
            plan.combine_op = FP8GradientOp(plan.combine_op, self.fp8_on_wire)
        return plan

    def _plan(self, topk_idx: torch.Tensor) -> DispatchPlan:
        tokens, k = topk_idx.shape
        local, ep = self.num_local, self.ep
        per_expert = count_per_expert(topk_idx.flatten(), self.num_experts)
        if ep == 1:
            plan = DispatchPlan(k, tokens, IdentityOp(), IdentityOp())
            plan.expand_received(topk_idx, local, per_expert.tolist())
            return plan
        # Which ranks each token goes to, and how many pairs and rows each rank gets.
        on_rank = torch.zeros(tokens, ep, dtype=torch.bool, device=topk_idx.device)
        on_rank.scatter_(1, topk_idx // local, True)
        if self.node_group is not None:
            return self._plan_two_level(topk_idx, per_expert, on_rank)
        counts = torch.cat([per_expert.view(ep, local), on_rank.sum(0, dtype=torch.long).view(ep, 1)], 1)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        sent, received = torch.stack([counts, recv_counts]).tolist()  # the one sync
        send_splits, recv_splits = [row[local] for row in sent], [row[local] for row in received]
        # The pairs, rank-major: positions r * tokens + t of the set entries of on_rank^T.
        pairs = torch.argsort((~on_rank.t()).flatten().to(torch.uint8), stable=True)[:sum(send_splits)]
        pair_rank, pair_token = pairs // tokens, pairs % tokens
        ids = topk_idx.index_select(0, pair_token)
        send_ids = torch.where(ids // local == pair_rank.unsqueeze(1), ids % local, -1).to(torch.int32)
        recv_ids = send_ids.new_empty(sum(recv_splits), k)
        dist.all_to_all_single(recv_ids, send_ids, recv_splits, send_splits, group=self.group)
        op = AllToAllOp(send_splits, recv_splits, self.group)
        plan = DispatchPlan(k, tokens, op, op.transposed(), pair_token=pair_token)
        plan.expand_received(recv_ids, local, [sum(row[e] for row in received) for e in range(local)])
        return plan

    def _plan_two_level(self, topk_idx: torch.Tensor, per_expert: torch.Tensor, on_rank: torch.Tensor) -> DispatchPlan:
        """Across nodes once per destination node, then inside it.

        Hop 1 (rail): a token goes to every node holding one of its experts, to
        the rank of this rank's index there, with its global expert ids (-1 for
        slots on other nodes). Hop 2 (node): that rank forwards it to every rank
        of its node holding one of them, itself included, with their local ids.
        One all_gather gives every rank each source's counts (rows per expert,
        pairs per rank, pairs per node), read back once; every split follows on
        the host, since a rank forwards to a peer exactly the pairs its rail's
        sources have for that peer.
        """
        tokens, k = topk_idx.shape
        local, ep, nodes, size, node, rail = self.num_local, self.ep, self.nodes, self.node_size, self.node, self.rail
        me = node * size + rail
        on_node = on_rank.view(tokens, nodes, size).any(2)
        counts = torch.cat([per_expert, on_rank.sum(0, dtype=torch.long), on_node.sum(0, dtype=torch.long)])
        table = [torch.empty_like(counts) for _ in range(ep)]
        dist.all_gather(table, counts, group=self.group)
        table = torch.stack(table).tolist()  # the one sync: [source, expert rows | rank pairs | node pairs]
        by_rank, by_node = ep * local, ep * local + ep
        rail_sources = range(rail, ep, size)  # the sources (one per node) whose tokens this rank forwards
        rail_send = table[me][by_node:by_node + nodes]
        rail_recv = [table[s][by_node + node] for s in rail_sources]
        node_send = [sum(table[s][by_rank + node * size + q] for s in rail_sources) for q in range(size)]
        node_recv = [sum(table[s][by_rank + me] for s in range(q, ep, size)) for q in range(size)]
        per_own_expert = [sum(row[me * local + e] for row in table) for e in range(local)]
        # Hop 1: the pairs (token, node), node-major, and their global ids on that node.
        pairs = torch.argsort((~on_node.t()).flatten().to(torch.uint8), stable=True)[:sum(rail_send)]
        pair_node, pair_token = pairs // tokens, pairs % tokens
        ids = topk_idx.index_select(0, pair_token).long()
        send_ids = torch.where(ids // (local * size) == pair_node.unsqueeze(1), ids, -1).to(torch.int32)
        held = send_ids.new_empty(sum(rail_recv), k)
        dist.all_to_all_single(held, send_ids, rail_recv, rail_send, group=self.rail_group)
        # Hop 2: the received tokens, once per peer of this node holding one of their experts, peer-major.
        held, arrived = held.long(), held.shape[0]
        peer = torch.where(held >= 0, held // local - node * size, size)  # size: a slot on another node
        on_peer = torch.zeros(arrived, size + 1, dtype=torch.bool, device=held.device).scatter_(1, peer, True)
        forward = torch.argsort((~on_peer[:, :size].t()).flatten().to(torch.uint8), stable=True)[:sum(node_send)]
        forward_peer, forward_row = forward // arrived, forward % arrived
        ids = held.index_select(0, forward_row)
        send_ids = torch.where(ids // local == (node * size + forward_peer).unsqueeze(1), ids % local, -1)
        recv_ids = send_ids.new_empty(sum(node_recv), k, dtype=torch.int32)
        dist.all_to_all_single(recv_ids, send_ids.to(torch.int32), node_recv, node_send, group=self.node_group)
        op = TwoHopOp(AllToAllOp(rail_send, rail_recv, self.rail_group), forward_row,
                      AllToAllOp(node_send, node_recv, self.node_group))
        plan = DispatchPlan(k, tokens, op, TransposedOp(op), pair_token=pair_token)
        plan.expand_received(recv_ids, local, per_own_expert)
        return plan

    # Local steps (autograd) around the two exchanges.
    @staticmethod
    def pack(x: torch.Tensor, gates: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """[T, H] tokens and [T, k] gates -> [pairs, H + k], one row per destination rank."""
        rows = torch.cat([x, gates.to(x.dtype)], 1)
        return rows if plan.pair_token is None else rows.index_select(0, plan.pair_token)

    @staticmethod
    def expand(received: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Received [N, H + k] -> expert-major rows [R, H] and their gates [R, 1]."""
        hidden, gates = received.split([received.shape[1] - plan.topk, plan.topk], 1)
        rows = hidden.index_select(0, plan.row_token)
        return rows, gates.reshape(-1).index_select(0, plan.row_slot).unsqueeze(1)

    @staticmethod
    def reduce(out: torch.Tensor, gates: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Expert outputs [R, H] gated and summed per received token: [N, H]."""
        return _GatedSum.apply(out, gates, plan.row_token, plan.recv_ids.shape[0])

    @staticmethod
    def unpack(combined: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """What the ranks returned, summed per source token: [T, H]."""
        if plan.pair_token is None:
            return combined
        return combined.new_zeros(plan.num_tokens, combined.shape[1]).index_add(0, plan.pair_token, combined)


@dataclass(frozen=True)
class DispatcherBackend:
    """A registered dispatcher, chosen by name: ``build(num_experts, ep_group, num_sms=, hidden=, fp8=)``
    (alltoall's also takes ``hop_groups=``, see :func:`make_dispatcher`)."""

    name: str
    build: Callable[..., "Dispatcher"]


BACKENDS: dict[str, DispatcherBackend] = {}


def register_dispatcher(backend: DispatcherBackend) -> None:
    BACKENDS[backend.name] = backend


def _build_alltoall(num_experts, ep_group=None, num_sms: int = 20, hidden: int = 0, hop_groups=None,
                    fp8: bool = False) -> Dispatcher:
    return Dispatcher(num_experts, ep_group, hop_groups, fp8=fp8)


def _build_local(num_experts, ep_group=None, num_sms: int = 20, hidden: int = 0, fp8: bool = False) -> Dispatcher:
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        raise ValueError("parallel.dispatcher=local works only with parallel.ep=1")
    return Dispatcher(num_experts, None, fp8=fp8)


register_dispatcher(DispatcherBackend("alltoall", _build_alltoall))
register_dispatcher(DispatcherBackend("local", _build_local))

# ``auto`` is alltoall, which is the local backend when ep=1. It never switches
# to an accelerated backend just because it imports: DeepEP needs bf16 and
# ep > 1, so ``deepep`` runs only when asked for by name.
AUTO_DISPATCHER = "alltoall"


def make_dispatcher(kind: str, num_experts: int, ep_group=None, num_sms: int = 20, hidden: int = 7168,
                    hop_groups: Optional[tuple] = None, fp8: bool = False) -> Dispatcher:
    """The registered backend ``kind``; ``auto`` is :data:`AUTO_DISPATCHER`
    (alltoall, local for ep=1). ``hop_groups`` (node group, rail group): the
    alltoall backend's two-level exchange (see :class:`Dispatcher`). ``fp8``:
    FP8 dispatch payloads (``train.fp8=blockwise``)."""
    kind = str(kind)
    if kind == "auto":
        kind = AUTO_DISPATCHER
    if kind not in BACKENDS:
        raise ValueError(f"unknown dispatcher {kind!r}: use auto or one of {', '.join(sorted(BACKENDS))}")
    if hop_groups is None:
        return BACKENDS[kind].build(num_experts, ep_group, num_sms=num_sms, hidden=hidden, fp8=fp8)
    if kind != "alltoall":
        raise ValueError(f"the two-level exchange is the alltoall dispatcher's, not {kind}'s")
    return BACKENDS[kind].build(num_experts, ep_group, num_sms=num_sms, hidden=hidden, hop_groups=hop_groups,
                                fp8=fp8)

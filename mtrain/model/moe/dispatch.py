"""Moving tokens to their experts and back.

A dispatcher cuts the routed half of an MoE layer at its two communication
points. The local steps (``permute``, ``regroup``, ``unregroup``,
``unpermute``) are ordinary autograd computations; the communication steps are
:class:`~mtrain.runtime.comm.CommOp` objects in the plan, which the MoE layer's
program exchanges (synchronously in a plain forward, overlapped with another
micro-batch's compute in the pipeline runtime).

Backends register themselves here (:func:`register_dispatcher`): ``local``
(ep=1, no communication) and ``alltoall`` (torch.distributed
``all_to_all_single`` with uneven splits, counts exchanged first; gloo and
nccl) in this module, ``deepep`` (``deep_ep.Buffer``, GPU only) in
:mod:`mtrain.model.moe.deepep`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mtrain.runtime.comm import AllToAllOp, CommOp, IdentityOp


@dataclass
class DispatchPlan:
    """Where every (token, slot) row goes and how received rows are grouped."""

    order: torch.Tensor  # [T*k] (token, slot) rows sorted by expert
    inverse_order: torch.Tensor
    topk: int
    dispatch_op: CommOp
    combine_op: CommOp
    # Filled once the received layout is known (after the dispatch for DeepEP).
    regroup: Optional[torch.Tensor] = None  # received row -> expert-major position
    inverse_regroup: Optional[torch.Tensor] = None
    tokens_per_expert: list[int] = field(default_factory=list)
    # [expert_tp, local experts] received rows of every expert_tp rank (expert_tp > 1),
    # on the device and as host lists; exchanged once per plan so recomputation does not repeat it.
    expert_tp_counts: Optional[tuple] = None


def count_per_expert(flat_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``flat_idx`` name each expert, on the device.
    (``bincount`` would read the maximum back to the host first.)"""
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_idx.device)
    return counts.index_add_(0, flat_idx, torch.ones_like(flat_idx))


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


class Dispatcher:
    """The alltoall backend; with ``ep_group`` None (or of size 1) it is the
    local backend: the same bookkeeping with no communication."""

    name = "alltoall"

    def __init__(self, num_experts: int, ep_group=None):
        self.num_experts = num_experts
        self.group = ep_group
        self.ep = 1 if ep_group is None else dist.get_world_size(ep_group)
        if self.ep == 1:
            self.name = "local"
        self.num_local = num_experts // self.ep

    def plan(self, topk_idx: torch.Tensor) -> DispatchPlan:
        """One host sync: the row counts the exchange and the grouped GEMM need,
        read back once (after the counts' all-to-all when ep > 1)."""
        flat = topk_idx.flatten()
        order = torch.argsort(flat, stable=True)
        per_expert = count_per_expert(flat, self.num_experts)
        if self.ep == 1:
            plan = DispatchPlan(order, torch.argsort(order), topk_idx.shape[1], IdentityOp(), IdentityOp())
            plan.tokens_per_expert = per_expert.tolist()
            return plan
        # Counts first: every rank learns how many rows it gets for each local expert.
        recv_counts = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_counts, per_expert, group=self.group)
        host = torch.stack([per_expert, recv_counts]).tolist()  # the one sync
        sent, received = host[0], host[1]
        local = self.num_local
        send_splits = [sum(sent[r * local:(r + 1) * local]) for r in range(self.ep)]
        recv_splits = [sum(received[r * local:(r + 1) * local]) for r in range(self.ep)]
        op = AllToAllOp(send_splits, recv_splits, self.group)
        plan = DispatchPlan(order, torch.argsort(order), topk_idx.shape[1], op, op.transposed())
        plan.regroup = expert_major_index(recv_counts.view(self.ep, local), sum(recv_splits))
        plan.inverse_regroup = torch.argsort(plan.regroup)
        plan.tokens_per_expert = [sum(received[r * local + e] for r in range(self.ep)) for e in range(local)]
        return plan

    # Local steps (autograd) around the two exchanges.
    @staticmethod
    def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """[T, H] tokens -> [T*k, H] rows sorted by expert (one row per selected expert)."""
        return x.index_select(0, plan.order // plan.topk)

    @staticmethod
    def regroup(recv: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return recv if plan.regroup is None else recv.index_select(0, plan.regroup)

    @staticmethod
    def unregroup(out: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return out if plan.inverse_regroup is None else out.index_select(0, plan.inverse_regroup)

    @staticmethod
    def unpermute(rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Rows back in (token, slot) order, weighted by the gates and summed per token."""
        per_slot = rows.index_select(0, plan.inverse_order)
        tokens = weights.shape[0]
        return (per_slot.view(tokens, plan.topk, -1) * weights.unsqueeze(-1)).sum(1)


@dataclass(frozen=True)
class DispatcherBackend:
    """A registered dispatcher, chosen by name: ``build(num_experts, ep_group, num_sms)``."""

    name: str
    build: Callable[..., "Dispatcher"]


BACKENDS: dict[str, DispatcherBackend] = {}


def register_dispatcher(backend: DispatcherBackend) -> None:
    BACKENDS[backend.name] = backend


def _build_alltoall(num_experts, ep_group=None, num_sms: int = 20) -> Dispatcher:
    return Dispatcher(num_experts, ep_group)


def _build_local(num_experts, ep_group=None, num_sms: int = 20) -> Dispatcher:
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        raise ValueError("parallel.dispatcher=local works only with parallel.ep=1")
    return Dispatcher(num_experts, None)


register_dispatcher(DispatcherBackend("alltoall", _build_alltoall))
register_dispatcher(DispatcherBackend("local", _build_local))

# ``auto`` is alltoall, which is the local backend when ep=1. It never switches
# to an accelerated backend just because it imports: DeepEP needs bf16 and
# ep > 1, so ``deepep`` runs only when asked for by name.
AUTO_DISPATCHER = "alltoall"


def make_dispatcher(kind: str, num_experts: int, ep_group=None, num_sms: int = 20) -> Dispatcher:
    """The registered backend ``kind``; ``auto`` is :data:`AUTO_DISPATCHER`
    (alltoall, local for ep=1)."""
    kind = str(kind)
    if kind == "auto":
        kind = AUTO_DISPATCHER
    if kind not in BACKENDS:
        raise ValueError(f"unknown dispatcher {kind!r}: use auto or one of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[kind].build(num_experts, ep_group, num_sms=num_sms)

"""Moving tokens to their experts and back.

A dispatcher cuts the routed half of an MoE layer at its two communication
points. The local steps (``permute``, ``regroup``, ``unregroup``,
``unpermute``) are ordinary autograd computations; the communication steps are
:class:`CommOp` objects with ``start`` (returns a :class:`Pending`; the data
moves while the caller does other work) and ``start_transpose`` (the same
exchange in reverse, which is its gradient). ``communicate`` wraps an op as a
synchronous autograd function for the plain forward path; the pipeline runtime
instead calls start/wait itself to overlap one micro-batch's exchange with
another's compute.

Backends: ``local`` (ep=1, no communication), ``alltoall``
(torch.distributed ``all_to_all_single`` with uneven splits, counts exchanged
first; gloo and nccl) and ``deepep`` (``deep_ep.Buffer``, GPU only, see
:mod:`mtrain.model.moe.deepep`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist


class Pending:
    """A tensor that is (or will be) the result of a started exchange."""

    def __init__(self, result: torch.Tensor, work=None, finish: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self._result, self._work, self._finish = result, work, finish

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._finish is not None:
            self._result, self._finish = self._finish(self._result), None
        return self._result


class CommOp:
    """A linear exchange of rows between ranks and its transpose."""

    def start(self, x: torch.Tensor) -> Pending:
        raise NotImplementedError

    def start_transpose(self, grad: torch.Tensor) -> Pending:
        raise NotImplementedError


class IdentityOp(CommOp):
    def start(self, x):
        return Pending(x)

    def start_transpose(self, grad):
        return Pending(grad)


class AllToAllOp(CommOp):
    """``all_to_all_single`` sending ``send_splits[j]`` rows to rank j of ``group``."""

    def __init__(self, send_splits: list[int], recv_splits: list[int], group):
        self.send_splits, self.recv_splits, self.group = send_splits, recv_splits, group

    @staticmethod
    def _exchange(x, send, recv, group) -> Pending:
        x = x.contiguous()
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        work = dist.all_to_all_single(out, x, recv, send, group=group, async_op=True)
        return Pending(out, work)

    def start(self, x):
        return self._exchange(x, self.send_splits, self.recv_splits, self.group)

    def start_transpose(self, grad):
        return self._exchange(grad, self.recv_splits, self.send_splits, self.group)

    def transposed(self) -> "AllToAllOp":
        return AllToAllOp(self.recv_splits, self.send_splits, self.group)


class TransposedOp(CommOp):
    def __init__(self, op: CommOp):
        self.op = op

    def start(self, x):
        return self.op.start_transpose(x)

    def start_transpose(self, grad):
        return self.op.start(grad)


class _Communicate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):
        ctx.op = op
        return op.start(x).wait()

    @staticmethod
    def backward(ctx, grad):
        return ctx.op.start_transpose(grad.contiguous()).wait(), None


def communicate(x: torch.Tensor, op: CommOp) -> torch.Tensor:
    """Run ``op`` synchronously, differentiably (its gradient is the transpose)."""
    return _Communicate.apply(x, op)


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
    # exchanged once per plan so recomputation does not repeat it.
    expert_tp_counts: Optional[torch.Tensor] = None


def expert_major_index(counts: torch.Tensor) -> torch.Tensor:
    """Rows arrive ordered (source rank, local expert); this index lists them
    expert-major, i.e. (local expert, source rank). ``counts`` is [sources, experts]."""
    sources, experts = counts.shape
    starts = torch.cumsum(counts.flatten(), 0) - counts.flatten()
    starts = starts.view(sources, experts)
    starts, counts_list = starts.tolist(), counts.tolist()
    pieces = [
        torch.arange(starts[s][e], starts[s][e] + counts_list[s][e], device=counts.device)
        for e in range(experts) for s in range(sources)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=counts.device)


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
        flat = topk_idx.flatten()
        order = torch.argsort(flat, stable=True)
        per_expert = torch.bincount(flat, minlength=self.num_experts)
        if self.ep == 1:
            plan = DispatchPlan(order, torch.argsort(order), topk_idx.shape[1], IdentityOp(), IdentityOp())
            plan.tokens_per_expert = per_expert.tolist()
            return plan
        # Counts first: every rank learns how many rows it gets for each local expert.
        recv_counts = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_counts, per_expert, group=self.group)
        recv_counts = recv_counts.view(self.ep, self.num_local)
        send_splits = per_expert.view(self.ep, self.num_local).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        op = AllToAllOp(send_splits, recv_splits, self.group)
        plan = DispatchPlan(order, torch.argsort(order), topk_idx.shape[1], op, op.transposed())
        plan.regroup = expert_major_index(recv_counts)
        plan.inverse_regroup = torch.argsort(plan.regroup)
        plan.tokens_per_expert = recv_counts.sum(0).tolist()
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


def make_dispatcher(kind: str, num_experts: int, ep_group=None, num_sms: int = 20):
    """``auto`` picks deepep on CUDA when deep_ep imports, else alltoall (local for ep=1)."""
    if kind == "auto":
        from mtrain.model.moe import deepep

        kind = "deepep" if torch.cuda.is_available() and deepep.available() else "alltoall"
    if kind == "deepep":
        from mtrain.model.moe.deepep import DeepEPDispatcher

        return DeepEPDispatcher(num_experts, ep_group, num_sms=num_sms)
    if kind == "local" and ep_group is not None and dist.get_world_size(ep_group) > 1:
        raise ValueError("parallel.dispatcher=local works only with parallel.ep=1")
    if kind not in ("local", "alltoall"):
        raise ValueError(f"unknown dispatcher {kind!r}: use auto, local, alltoall or deepep")
    return Dispatcher(num_experts, ep_group)

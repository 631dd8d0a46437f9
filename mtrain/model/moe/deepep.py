"""The ``deepep`` dispatcher: DeepEP's ``Buffer`` (GPU only, imported lazily).

Every (token, slot) row is dispatched as its own top-1 token, so received rows
map to exactly one local expert and the gate weights are applied at the
source after the combine, as in the alltoall backend. This trades DeepEP's
per-rank token de-duplication (less traffic) for identical numerics and one
code path for the weights; the exchange itself, its async events and its
comm-stream allocation are DeepEP's.
"""
from __future__ import annotations

import importlib

import torch

from mtrain.model.moe.dispatch import DispatcherBackend, DispatchPlan, Dispatcher, register_dispatcher
from mtrain.runtime.comm import CommOp, Pending

_INSTALL_HINT = (
    "the deepep dispatcher needs the deep_ep package (DeepEP, built against NVSHMEM; see the Dockerfile) "
    "and CUDA; install it or set parallel.dispatcher=alltoall"
)


def available() -> bool:
    try:
        importlib.import_module("deep_ep")
        return True
    except ImportError:
        return False


def import_deep_ep():
    try:
        return importlib.import_module("deep_ep")
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e


def regroup_received(recv_local_expert: torch.Tensor, num_local: int) -> tuple[torch.Tensor, list[int]]:
    """Received rows carry their local expert id ([R] or [R, 1]); return the
    expert-major order of the rows and the row count of every local expert."""
    ids = recv_local_expert.reshape(-1)
    if (ids < 0).any() or (ids >= num_local).any():
        raise ValueError("received a row for an expert this rank does not hold")
    return torch.argsort(ids, stable=True), torch.bincount(ids, minlength=num_local).tolist()


class _DeepEPDispatchOp(CommOp):
    def __init__(self, dispatcher: "DeepEPDispatcher", plan: DispatchPlan, layout, row_experts):
        self.d, self.plan, self.layout, self.row_experts = dispatcher, plan, layout, row_experts
        self.handle = None

    def start(self, rows):
        buffer = self.d.buffer
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank = self.layout
        recv, recv_idx, _, counts, handle, event = buffer.dispatch(
            rows, topk_idx=self.row_experts, topk_weights=torch.ones_like(self.row_experts, dtype=torch.float32),
            num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
            previous_event=self.d.capture(), async_finish=True, allocate_on_comm_stream=True,
        )
        self.handle = handle

        def finish(out):
            event.current_stream_wait()
            self.plan.regroup, _ = regroup_received(recv_idx, self.d.num_local)
            self.plan.inverse_regroup = torch.argsort(self.plan.regroup)
            self.plan.tokens_per_expert = list(counts)
            return out

        return Pending(recv, finish=finish)

    def start_transpose(self, grad):
        combined, _, event = self.d.buffer.combine(
            grad, self.handle, previous_event=self.d.capture(), async_finish=True, allocate_on_comm_stream=True
        )
        return Pending(combined, finish=lambda out: (event.current_stream_wait(), out)[1])


class _DeepEPCombineOp(CommOp):
    def __init__(self, dispatch_op: _DeepEPDispatchOp):
        self.dispatch_op = dispatch_op

    def start(self, rows):
        return self.dispatch_op.start_transpose(rows)

    def start_transpose(self, grad):
        d = self.dispatch_op.d
        recv, _, _, _, _, event = d.buffer.dispatch(
            grad, handle=self.dispatch_op.handle, previous_event=d.capture(),
            async_finish=True, allocate_on_comm_stream=True,
        )
        return Pending(recv, finish=lambda out: (event.current_stream_wait(), out)[1])


class DeepEPDispatcher(Dispatcher):
    name = "deepep"

    def __init__(self, num_experts: int, ep_group, num_sms: int = 20, nvl_bytes: int = 256 << 20):
        deep_ep = import_deep_ep()
        if not torch.cuda.is_available():
            raise RuntimeError(_INSTALL_HINT)
        super().__init__(num_experts, ep_group)
        self.name = "deepep"
        deep_ep.Buffer.set_num_sms(num_sms)
        self.buffer = deep_ep.Buffer(ep_group, nvl_bytes, 0)
        self._deep_ep = deep_ep

    def capture(self):
        return self._deep_ep.Buffer.capture()

    def plan(self, topk_idx):
        flat = topk_idx.flatten()
        order = torch.argsort(flat, stable=True)
        row_experts = flat.index_select(0, order).unsqueeze(1)
        num_per_rank, num_per_rdma, num_per_expert, in_rank, _ = self.buffer.get_dispatch_layout(row_experts, self.num_experts)
        plan = DispatchPlan(order, torch.argsort(order), topk_idx.shape[1], None, None)
        plan.dispatch_op = _DeepEPDispatchOp(self, plan, (num_per_rank, num_per_rdma, num_per_expert, in_rank), row_experts)
        plan.combine_op = _DeepEPCombineOp(plan.dispatch_op)
        return plan


# Only by name (parallel.dispatcher=deepep): ``auto`` never picks it.
register_dispatcher(DispatcherBackend(
    "deepep", lambda num_experts, ep_group=None, num_sms=20: DeepEPDispatcher(num_experts, ep_group, num_sms=num_sms)))

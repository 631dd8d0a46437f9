"""The ``deepep`` dispatcher: DeepEP's ``Buffer`` (GPU only, imported lazily).

DeepEP speaks the token-level scheme of :mod:`mtrain.model.moe.dispatch`
natively: ``dispatch`` takes the tokens with their top-k expert ids and
weights, sends each token once to every rank (and, across nodes, once per
node over RDMA, then on over NVLink) that holds one of its experts, and hands
the receiver the local expert id of each slot (-1 where another rank serves
it) with the weights; ``combine`` sums the rows each rank returns per token.
The gates travel as DeepEP's ``topk_weights`` (fp32), and their gradients
come back through ``combine``'s; the hidden states travel in bf16, or, with
``train.fp8=blockwise``, as DeepEP's FP8 form: a tuple of E4M3 data ``[T, H]``
and fp32 scales ``[T, H / 128]`` (one per 1x128 tile, quantized here by
:func:`mtrain.model.fp8.quantize_tiles`), which the experts' Fprop uses as it
arrives (``DispatchPlan.received_tiles``). The combine's backward (a cached
``dispatch``) sends the output gradient in the same FP8 form; the combine
and the dispatch's backward stay bf16. The FP8 form has not run here (no
GPU): only its bookkeeping (:func:`dispatch_input`, :func:`received_rows`)
is tested.

One ``Buffer`` per EP group serves every MoE layer, sized from DeepEP's own
size hints for the model's hidden size (NVLink bytes, and RDMA bytes beyond
one node); the SM budget is ``parallel.deepep_num_sms``. Every exchange runs
on DeepEP's communication stream (``allocate_on_comm_stream``,
``async_finish``) after an event captured on the compute stream, and the
compute stream waits on its event only when the result is needed, so the
other micro-batch's compute overlaps it.

Written against DeepEP's v1 Python API (``deep_ep.Buffer`` with
``get_dispatch_layout`` / ``dispatch`` / ``combine``); the Dockerfile pins a
release that has it.
"""
from __future__ import annotations

import importlib

import torch

from mtrain.model.fp8 import dequantize_tiles, quantize_tiles
from mtrain.model.moe.dispatch import DispatcherBackend, DispatchPlan, Dispatcher, register_dispatcher
from mtrain.runtime.comm import CommOp, Pending

_INSTALL_HINT = (
    "the deepep dispatcher needs the deep_ep package (DeepEP, built against NVSHMEM; see the Dockerfile) "
    "and CUDA; install it or set parallel.dispatcher=alltoall"
)
# EP sizes DeepEP has tuned configs for (intranode up to 8 NVLink peers, internode beyond).
SUPPORTED_EP_SIZES = (2, 4, 8, 16, 24, 32, 64, 128, 144, 160)
NVL_PEERS = 8


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


def config_errors(ep: int, dtype: str) -> list[str]:
    """What DeepEP cannot do with this layout and dtype (``train.dtype`` resolved)."""
    errors = []
    if ep == 1:
        errors.append("parallel.dispatcher=deepep needs parallel.ep > 1 (with ep=1 nothing is exchanged: use auto)")
    elif ep not in SUPPORTED_EP_SIZES:
        errors.append(f"parallel.dispatcher=deepep supports parallel.ep in {', '.join(map(str, SUPPORTED_EP_SIZES))}"
                      f", not {ep}; use parallel.dispatcher=alltoall")
    if dtype != "bf16":
        errors.append(f"parallel.dispatcher=deepep sends bf16 (its combine is bf16 only); train.dtype={dtype}: "
                      f"set train.dtype=bf16 or parallel.dispatcher=alltoall")
    return errors


_BUFFERS: dict = {}  # one per EP group, like the group's communicators: shared by every layer


def shared_buffer(deep_ep, group, hidden: int):
    """The group's buffer, (re)built large enough for ``hidden`` bf16 channels."""
    ranks = group.size()
    hidden_bytes = hidden * 2
    configs = (deep_ep.Buffer.get_dispatch_config(ranks), deep_ep.Buffer.get_combine_config(ranks))
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, ranks) for c in configs)
    rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, ranks) for c in configs) if ranks > NVL_PEERS else 0
    key = id(group)
    buffer, sizes = _BUFFERS.get(key, (None, (0, 0)))
    if buffer is None or nvl > sizes[0] or rdma > sizes[1]:
        buffer = deep_ep.Buffer(group, max(nvl, sizes[0]), max(rdma, sizes[1]))
        _BUFFERS[key] = (buffer, (max(nvl, sizes[0]), max(rdma, sizes[1])))
    return buffer


def _waited(event, build):
    """A finish step: make the compute stream wait on ``event``, then ``build``."""
    def finish(_):
        event.current_stream_wait()
        return build()
    return finish


def dispatch_input(rows: torch.Tensor, topk: int, fp8: bool):
    """Rows [T, H + k] -> DeepEP's ``x`` (bf16 [T, H], or (E4M3 [T, H], fp32
    scales [T, H / 128]) with ``fp8``) and ``topk_weights`` (fp32 [T, k])."""
    x, gates = rows[:, :-topk].contiguous(), rows[:, -topk:].float().contiguous()
    return (quantize_tiles(x) if fp8 else x), gates


def received_rows(recv_x, recv_gates: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype) -> torch.Tensor:
    """DeepEP's received ``x`` and weights -> rows [N, H + k] in ``dtype``; an
    FP8 ``recv_x`` (a tuple) goes to ``plan.received_tiles`` for the experts,
    and the rows hold its dequantized values."""
    if isinstance(recv_x, tuple):
        plan.received_tiles = recv_x
        recv_x = dequantize_tiles(*recv_x).to(dtype)
    return torch.cat([recv_x, recv_gates.to(recv_x.dtype)], 1)


class _DispatchOp(CommOp):
    """Tokens with their gates ([T, H + k]) -> received tokens with their gates ([N, H + k])."""

    def __init__(self, d: "DeepEPDispatcher", plan: DispatchPlan, topk_idx: torch.Tensor, layout):
        self.d, self.plan, self.topk_idx, self.layout = d, plan, topk_idx, layout
        self.handle = None

    def start(self, rows):
        x, gates = dispatch_input(rows, self.plan.topk, self.d.fp8)
        per_rank, per_rdma_rank, per_expert, in_rank = self.layout
        recv_x, recv_idx, recv_gates, counts, self.handle, event = self.d.buffer.dispatch(
            x, topk_idx=self.topk_idx, topk_weights=gates, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            previous_event=self.d.capture(), async_finish=True, allocate_on_comm_stream=True)

        def build():
            self.plan.expand_received(recv_idx, self.d.num_local, list(counts))
            return received_rows(recv_x, recv_gates, self.plan, rows.dtype)
        return Pending(None, finish=_waited(event, build))

    def start_transpose(self, grad):
        k = self.plan.topk
        gx, ggates = grad[:, :-k].contiguous(), grad[:, -k:].float().contiguous()
        x, gates, event = self.d.buffer.combine(gx, self.handle, topk_weights=ggates, previous_event=self.d.capture(),
                                                async_finish=True, allocate_on_comm_stream=True)
        return Pending(x, finish=_waited(event, lambda: torch.cat([x, gates.to(x.dtype)], 1)))


class _CombineOp(CommOp):
    """Summed expert outputs per received token ([N, H]) -> per source token ([T, H])."""

    def __init__(self, dispatch_op: _DispatchOp):
        self.dispatch_op = dispatch_op

    def start(self, rows):
        d = self.dispatch_op.d
        x, _, event = d.buffer.combine(rows.contiguous(), self.dispatch_op.handle, previous_event=d.capture(),
                                       async_finish=True, allocate_on_comm_stream=True)
        return Pending(x, finish=_waited(event, lambda: x))

    def start_transpose(self, grad):
        d = self.dispatch_op.d
        x = quantize_tiles(grad.contiguous()) if d.fp8 else grad.contiguous()
        recv, _, _, _, _, event = d.buffer.dispatch(x, handle=self.dispatch_op.handle,
                                                    previous_event=d.capture(), async_finish=True,
                                                    allocate_on_comm_stream=True)
        if isinstance(recv, tuple):
            return Pending(None, finish=_waited(event, lambda: dequantize_tiles(*recv).to(grad.dtype)))
        return Pending(recv, finish=_waited(event, lambda: recv))


class DeepEPDispatcher(Dispatcher):
    name = "deepep"

    def __init__(self, num_experts: int, ep_group, num_sms: int = 20, hidden: int = 7168, fp8: bool = False):
        deep_ep = import_deep_ep()
        if not torch.cuda.is_available():
            raise RuntimeError(_INSTALL_HINT)
        super().__init__(num_experts, ep_group, fp8=fp8)
        self.name = "deepep"
        deep_ep.Buffer.set_num_sms(num_sms)
        self.buffer = shared_buffer(deep_ep, ep_group, hidden)
        self._deep_ep = deep_ep

    def capture(self):
        return self._deep_ep.Buffer.capture()

    def plan(self, topk_idx):
        """The layout DeepEP needs (computed on its stream); the received side
        is filled when the dispatch lands."""
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(
            topk_idx, self.num_experts, previous_event=self.capture(), async_finish=False,
            allocate_on_comm_stream=True)
        plan = DispatchPlan(topk_idx.shape[1], topk_idx.shape[0], None, None)
        plan.dispatch_op = _DispatchOp(self, plan, topk_idx, (per_rank, per_rdma_rank, per_expert, in_rank))
        plan.combine_op = _CombineOp(plan.dispatch_op)
        return plan


# Only by name (parallel.dispatcher=deepep): ``auto`` never picks it.
register_dispatcher(DispatcherBackend(
    "deepep", lambda num_experts, ep_group=None, num_sms=20, hidden=7168, fp8=False: DeepEPDispatcher(
        num_experts, ep_group, num_sms=num_sms, hidden=hidden, fp8=fp8)))

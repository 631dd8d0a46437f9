"""Exchanges between ranks that start now and finish later.

A :class:`CommOp` is a linear exchange of rows: ``start`` returns a
:class:`Pending` while the data moves, ``start_transpose`` runs the exchange in
reverse (its gradient); :class:`TwoHopOp` chains two exchanges with a
forwarding step between them (the two-level expert dispatch).
:func:`communicate` wraps an op as a synchronous autograd function for the
plain forward path; the overlapped runner instead starts and waits itself so
another micro-batch computes in between.
"""
from __future__ import annotations

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

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Pending":
        """This result once it is in, passed through ``fn`` (which may run another exchange)."""
        return Pending(None, finish=lambda _: fn(self.wait()))


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


class TwoHopOp(CommOp):
    """``first``, then the rows it delivered picked by ``forward`` (an index,
    so a row may go on several times or not at all) sent on through
    ``second``: the two-level expert dispatch, across nodes then inside the
    node. ``start`` leaves ``first`` in flight and runs the rest on ``wait``;
    the transpose runs ``second`` back at once, adds the returned rows up per
    forwarded row (``index_add``) and leaves ``first`` back in flight. So the
    exchange in flight while other work runs is ``first`` (the inter-node
    one) in both directions."""

    def __init__(self, first: AllToAllOp, forward: torch.Tensor, second: AllToAllOp):
        self.first, self.forward, self.second = first, forward, second

    def start(self, x):
        return self.first.start(x).then(lambda rows: self.second.start(rows.index_select(0, self.forward)).wait())

    def start_transpose(self, grad):
        back = self.second.start_transpose(grad).wait()
        rows = back.new_zeros((sum(self.first.recv_splits),) + tuple(back.shape[1:]))
        return self.first.start_transpose(rows.index_add_(0, self.forward, back))


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

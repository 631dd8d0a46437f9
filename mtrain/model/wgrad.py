"""Linear layers whose weight gradient can be deferred.

Zero-bubble pipeline schedules split a backward pass into B (gradients for
the inputs, needed by the previous stage now) and W (gradients for the
weights, which can wait). Inside ``defer_weight_grads()`` the backward of
:func:`linear` (and of the grouped expert GEMM) computes only the input
gradient and queues the weight-gradient work; ``PendingWeightGrads.run()``
later accumulates it into ``param.grad`` in the original order.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

_active: Optional["PendingWeightGrads"] = None


class PendingWeightGrads:
    """Weight-gradient work queued by one backward pass."""

    def __init__(self):
        self.work: list[Callable[[], None]] = []

    @torch.no_grad()
    def run(self) -> None:
        # Outside autograd's backward, grad mode is on: the saved inputs still
        # require grad and the weight gradients must not build a graph.
        work, self.work = self.work, []
        for fn in work:
            fn()

    def __len__(self) -> int:
        return len(self.work)


@contextlib.contextmanager
def defer_weight_grads():
    """Within this block, linear weight gradients are queued, not computed."""
    global _active
    previous, _active = _active, PendingWeightGrads()
    try:
        yield _active
    finally:
        _active = previous


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad += grad


def schedule_weight_grad(params_and_fns) -> bool:
    """Queue ``[(param, fn)]`` when deferring (returns True); else do nothing (False)."""
    if _active is None:
        return False
    for param, fn in params_and_fns:
        _active.work.append(lambda p=param, f=fn: accumulate_grad(p, f()))
    return True


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        # The parameter itself: under activation checkpointing the saved copy is
        # detached, and deferred gradients must land on the real parameter.
        ctx.param = weight
        ctx.has_bias = bias is not None
        out = x @ weight.t()
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_b = g2.sum(0) if ctx.has_bias else None
        if schedule_weight_grad([(ctx.param, lambda: g2.t() @ x2)]):
            return grad_x, None, grad_b
        return grad_x, g2.t() @ x2, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` whose weight gradient can be deferred."""
    return _Linear.apply(x, weight, bias)

"""Linear layers whose weight gradient can be deferred.

Zero-bubble pipeline schedules split a backward pass into B (gradients for
the inputs, needed by the previous stage now) and W (gradients for the
weights, which can wait). The forward of :func:`linear` (and of the grouped
expert GEMM) captures the step context it runs in; while that context defers
weight gradients (:meth:`StepContext.deferring_weight_grads`), the backward
computes only the input gradient and queues the weight-gradient work in the
context's sink, which its W runs later, in the original order.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mtrain.runtime.context import StepContext, current_step


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param``'s gradient += ``grad``: into its fp32 ``main_grad`` when it has
    one (16-bit parameters in training, see mtrain.train.grads), else ``.grad``."""
    main = getattr(param, "main_grad", None)
    if main is not None:
        main.add_(grad)
    elif param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad += grad


def defer_weight_grad(step: Optional[StepContext], param: torch.Tensor, fn: Callable[[], torch.Tensor]) -> bool:
    """Queue ``param.grad += fn()`` in ``step``'s sink when it defers (True); else False."""
    if step is None or step.weight_grads is None:
        return False
    step.weight_grads.work.append(lambda: accumulate_grad(param, fn()))
    return True


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        # The parameter itself: under activation checkpointing the saved copy is
        # detached, and deferred gradients must land on the real parameter.
        ctx.param = weight
        ctx.step = current_step()
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
        if defer_weight_grad(ctx.step, ctx.param, lambda: g2.t() @ x2):
            return grad_x, None, grad_b
        return grad_x, g2.t() @ x2, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` whose weight gradient can be deferred."""
    return _Linear.apply(x, weight, bias)

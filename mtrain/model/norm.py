"""RMSNorm, computed in fp32 whatever the activation dtype."""
from __future__ import annotations

import torch
from torch import nn

from mtrain.model.compiled import compiled
from mtrain.model.params import tag


class _RMSNormFunction(torch.autograd.Function):
    """Keeps only the input (in its own dtype) and one fp32 reciprocal RMS per
    row for the backward, as fused RMSNorm kernels do, not the fp32 copies the
    composed ops would keep (8 bytes per element for bf16 inputs)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad = grad_out.float()
        grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = grad * weight.float()
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, in fp32, cast back to ``x``'s dtype."""
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension.

    The statistics and the scaling run in fp32 so bf16 activations do not lose
    precision in the mean of squares; the result is cast back to the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6, compile: bool = False):
        super().__init__()
        self.eps = eps
        self._norm = compiled(rms_norm, compile)
        self.weight = nn.Parameter(torch.ones(dim))
        tag(self.weight, no_decay=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.eps)

"""RMSNorm, computed in fp32 whatever the activation dtype."""
from __future__ import annotations

import torch
from torch import nn

from mtrain.model.compiled import compiled
from mtrain.model.params import tag


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


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

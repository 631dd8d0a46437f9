"""Routed experts stored grouped (one tensor per projection, leading dim =
local experts) and run through one grouped-GEMM entry point."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtrain.model.params import tag
from mtrain.model.wgrad import schedule_weight_grad


def _split(x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, counts, dim=0))


def grouped_matmul_reference(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of ``x`` grouped by expert (``counts`` rows each) times ``weight[e].T``."""
    outs = [xe @ weight[e].t() for e, xe in enumerate(_split(x, counts))]
    return torch.cat(outs, 0) if outs else x.new_empty(0, weight.shape[1])


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts):
        ctx.save_for_backward(x, weight)
        ctx.param = weight  # see wgrad._Linear: deferred grads go to the real parameter
        ctx.counts = counts
        return grouped_matmul_reference(x, weight, counts)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        counts = ctx.counts
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.cat([g @ weight[e] for e, g in enumerate(_split(grad_out, counts))], 0)

        def weight_grad():
            return torch.stack([g.t() @ xe for g, xe in zip(_split(grad_out, counts), _split(x, counts))])

        if not ctx.needs_input_grad[1] or schedule_weight_grad([(ctx.param, weight_grad)]):
            return grad_x, None, None
        return grad_x, weight_grad(), None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The grouped-GEMM entry point: ``x`` [R, in] grouped by expert, ``weight``
    [E, out, in]. Its weight gradient can be deferred like :func:`linear`'s."""
    return _GroupedLinear.apply(x, weight, [int(c) for c in counts])


class GroupedExperts(nn.Module):
    """``num_local`` SwiGLU experts: down(silu(gate(x)) * up(x)) per expert."""

    def __init__(self, num_local: int, hidden: int, ffn: int, init_std: float):
        super().__init__()
        self.gate = tag(nn.Parameter(torch.empty(num_local, ffn, hidden)), expert=True)
        self.up = tag(nn.Parameter(torch.empty(num_local, ffn, hidden)), expert=True)
        self.down = tag(nn.Parameter(torch.empty(num_local, hidden, ffn)), expert=True)
        for w in (self.gate, self.up, self.down):
            nn.init.normal_(w, std=init_std)

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        act = F.silu(grouped_linear(x, self.gate, tokens_per_expert)) * grouped_linear(x, self.up, tokens_per_expert)
        return grouped_linear(act, self.down, tokens_per_expert)

"""Routed experts stored grouped (one tensor per projection, leading dim =
local experts) and run through one grouped-GEMM entry point (or, with
``train.fp8=blockwise``, the FP8 reference's grouped linear, docs/fp8.md)."""
from __future__ import annotations

import torch
import torch.nn as nn

from typing import Optional

from mtrain.model.compiled import compiled, rows_vary
from mtrain.model.activations import swiglu
from mtrain.model.fp8_linear import fp8_grouped_linear, fp8_swiglu_linear
from mtrain.model.moe.gemm_backends import grouped_gemm_backend
from mtrain.model.params import tag
from mtrain.runtime.context import current_step
from mtrain.runtime.wgrad import defer_weight_grad


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts, gemm):
        ctx.save_for_backward(x, weight)
        ctx.param = weight  # see runtime.wgrad._Linear: deferred grads go to the real parameter
        ctx.step = current_step()
        ctx.counts, ctx.gemm = counts, gemm
        return gemm.forward(x, weight, counts)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        counts, gemm = ctx.counts, ctx.gemm
        grad_x = gemm.grad_input(grad_out, weight, counts) if ctx.needs_input_grad[0] else None

        def weight_grad():
            return gemm.grad_weight(grad_out, x, counts)

        if not ctx.needs_input_grad[1] or defer_weight_grad(ctx.step, ctx.param, weight_grad):
            return grad_x, None, None, None
        return grad_x, weight_grad(), None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int], backend: str = "torch") -> torch.Tensor:
    """The grouped-GEMM entry point: ``x`` [R, in] grouped by expert, ``weight``
    [E, out, in]; ``backend`` is a ``model.grouped_gemm`` value. Its weight
    gradient can be deferred like :func:`linear`'s."""
    return _GroupedLinear.apply(x, weight, [int(c) for c in counts], grouped_gemm_backend(backend))


class GroupedExperts(nn.Module):
    """``num_local`` SwiGLU experts: down(silu(gate(x)) * up(x)) per expert.
    ``grouped_gemm`` picks the GEMM backend (``model.grouped_gemm``). With
    expert_tp > 1, ``ffn`` is this rank's slice of the expert width: gate/up
    are split along dim 1, down along dim 2, and the output is a partial sum.

    ``fp8``: the three projections run the FP8 reference
    (:mod:`mtrain.model.fp8_linear`, whatever ``grouped_gemm`` says), the
    SwiGLU's inputs kept in FP8 and its output recomputed for the backward;
    ``forward``'s ``tiles`` are the input rows' 1x128 FP8 tiles when the
    dispatch delivered them, used by gate and up as they are."""

    def __init__(self, num_local: int, hidden: int, ffn: int, init_std: float, grouped_gemm: str = "auto",
                 compile: bool = False, fp8: bool = False):
        super().__init__()
        self._act = compiled(swiglu, compile)
        grouped_gemm_backend(grouped_gemm)  # fail at construction, not at the first step
        self.grouped_gemm = grouped_gemm
        self.fp8 = fp8
        self.gate = tag(nn.Parameter(torch.empty(num_local, ffn, hidden)), expert=True, shard_dim=1,
                        shard_group="expert_tp")
        self.up = tag(nn.Parameter(torch.empty(num_local, ffn, hidden)), expert=True, shard_dim=1,
                      shard_group="expert_tp")
        self.down = tag(nn.Parameter(torch.empty(num_local, hidden, ffn)), expert=True, shard_dim=2,
                        shard_group="expert_tp")
        for w in (self.gate, self.up, self.down):
            nn.init.normal_(w, std=init_std)

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int],
                tiles: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        counts, gemm = tokens_per_expert, self.grouped_gemm
        if self.fp8:
            gate = rows_vary(fp8_grouped_linear(x, self.gate, counts, tiles))
            up = rows_vary(fp8_grouped_linear(x, self.up, counts, tiles))
            return fp8_swiglu_linear(gate, up, self.down, counts)
        act = self._act(rows_vary(grouped_linear(x, self.gate, counts, gemm)),
                        rows_vary(grouped_linear(x, self.up, counts, gemm)))
        return grouped_linear(act, self.down, counts, gemm)

"""FP8 layers: the linear, the routed experts' grouped linear, and SwiGLU
feeding a linear, each with Fprop, Dgrad and Wgrad through the reference
GEMMs of :mod:`mtrain.model.fp8` (docs/fp8.md).

What they keep for the backward is what DeepSeek-V3 keeps (report §3.3.3):

- **Weights**: one FP8 copy (128x128 blocks) per weight while a step's
  micro-batches run (:func:`mtrain.runtime.context.weights_fixed`), shared by
  all of them; outside such a block, one per call.
- **Inputs**: not the input, only Wgrad's operand, quantized along the tokens
  when the forward runs (:func:`mtrain.model.fp8.quantize_columns`, per
  expert for the experts): the same bits Wgrad would compute from the input
  later, at 1 + 4/128 bytes per element. A tensor read by several FP8 layers
  (MLA's q_a and kv_a, an MLP's gate and up) is quantized once for all.
- **SwiGLU**: its two inputs as 1x128 FP8 tiles; its output, the next
  linear's input, is recomputed from them in the backward.

A plain linear is one group of rows; the experts' rows come in groups of
``counts[e]``, each multiplied by its own expert's weight, so an expert's
ragged row count is padded on its own and an empty expert gets a zero weight
gradient. Weight gradients are queued in the captured step context's sink
while a zero-bubble schedule defers W (as :mod:`mtrain.runtime.wgrad`'s).
"""
from __future__ import annotations

from typing import Optional

import torch

from mtrain.model.activations import swiglu
from mtrain.model.fp8 import (BLOCK, check_multiple, dequantize_tiles, dgrad, fp8_matmul, pad_rows,
                              quantize_blocks, quantize_columns, quantize_expert_blocks, quantize_tiles, wgrad)
from mtrain.runtime.context import current_step, fixed_weights_cache
from mtrain.runtime.wgrad import defer_weight_grad


# -- what is kept ----------------------------------------------------------------------------------

def weight_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (``[N, K]`` or experts' ``[E, N, K]``) in 128x128 blocks, N
    padded: (fp8 ``[E, Np, K]``, scales ``[E, Np / 128, K / 128]``), E = 1 for a
    plain weight. Made once per weight while weights are fixed."""
    def make():
        if weight.dim() == 3:
            return quantize_expert_blocks(weight)
        data, scales = quantize_blocks(pad_rows(weight.detach()))
        return data[None], scales[None]

    cache = fixed_weights_cache()
    if cache is None or not weight.is_leaf:
        return make()
    key = ("fp8 blocks", id(weight))
    if key not in cache or cache[key][0] is not weight:
        cache[key] = (weight, make())
    return cache[key][1]


def group_slices(counts: list[int]):
    """(group, its rows) for every group with rows; empty groups are skipped."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, slice(start, start + c)
        start += c


_COLUMNS = "_mtrain_fp8_columns"  # a tensor's attribute: its Wgrad operands, per grouping


def input_columns(x: torch.Tensor, counts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wgrad's operand of every non-empty group of ``x``'s rows (flattened to
    ``[T, K]``): :func:`quantize_columns` of each. Kept on ``x`` itself, so the
    next FP8 layer reading the same tensor with the same grouping (and
    version) gets the same tensors, and the backward keeps one copy."""
    key = (x._version, tuple(counts))
    memo = getattr(x, _COLUMNS, None)
    if memo is None or memo[0] != key:
        x2 = x.detach().reshape(-1, x.shape[-1])
        memo = (key, [quantize_columns(x2[rows]) for _, rows in group_slices(counts)])
        setattr(x, _COLUMNS, memo)
    return memo[1]


# -- the GEMMs over groups of rows ---------------------------------------------------------------

def _fprop(x2: torch.Tensor, tiles: tuple[torch.Tensor, torch.Tensor], qw, sw, counts: list[int],
           n: int) -> torch.Tensor:
    """Each group's rows (their 1x128 ``tiles``) times its weight; ``[T, n]`` in ``x2``'s dtype."""
    data, scales = tiles
    y = x2.new_zeros(x2.shape[0], n)
    for e, rows in group_slices(counts):
        y[rows] = fp8_matmul(data[rows], scales[rows], qw[e], sw[e])[:, :n].to(x2.dtype)
    return y


def _dgrad(g2: torch.Tensor, qw, sw, counts: list[int], k: int, dtype: torch.dtype) -> torch.Tensor:
    out = g2.new_zeros(g2.shape[0], k, dtype=dtype)
    for e, rows in group_slices(counts):
        out[rows] = dgrad(g2[rows], qw[e], sw[e]).to(dtype)
    return out


def _weight_grad(g2: torch.Tensor, columns: list, counts: list[int], shape: torch.Size):
    """The weight gradient (fp32, ``shape``) from the output gradient and the
    kept columns, group by group."""
    n, k = shape[-2], shape[-1]
    out = torch.zeros(len(counts), n, k, dtype=torch.float32, device=g2.device)
    for (e, rows), cols in zip(group_slices(counts), columns):
        out[e] = wgrad(g2[rows], cols)
    return out.reshape(shape)


def _finish_weight_grad(ctx, compute):
    """The weight gradient to return: None when deferred to the step's W."""
    if defer_weight_grad(ctx.step, ctx.param, compute):
        return None
    return compute().to(ctx.weight_dtype)


def _check(name: str, x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> None:
    k = x.shape[-1]
    if weight.shape[-1] != k:
        raise ValueError(f"{name}: weight of shape {list(weight.shape)} does not take inputs of shape "
                         f"{list(x.shape)}")
    experts = weight.shape[0] if weight.dim() == 3 else 1
    if len(counts) != experts or sum(counts) != x.numel() // k:
        raise ValueError(f"{name}: counts {counts} do not split {x.numel() // k} rows over {experts} "
                         f"expert(s)")
    check_multiple(f"{name} input", x.shape, (x.dim() - 1,), BLOCK)


def _remember(ctx, weight: torch.Tensor, counts: list[int]) -> None:
    ctx.param = weight  # deferred gradients must land on the real parameter (see wgrad._Linear)
    ctx.step = current_step()
    ctx.counts, ctx.weight_dtype, ctx.weight_shape = counts, weight.dtype, weight.shape


# -- the layers ------------------------------------------------------------------------------------

class FP8Linear(torch.autograd.Function):
    """``x @ W^T (+ b)`` per group of rows (docstring of the module).
    ``x_data``/``x_scales``: ``x``'s 1x128 tiles when the caller already holds
    them (an FP8 dispatch payload; ``x`` is their dequantized value): Fprop
    uses them as they are."""

    @staticmethod
    def forward(ctx, x, weight, bias, counts, x_data, x_scales, for_backward):
        _check("fp8_linear", x, weight, counts)
        n, k = weight.shape[-2], x.shape[-1]
        x2 = x.reshape(-1, k)
        qw, sw = weight_blocks(weight)
        tiles = (x_data, x_scales) if x_data is not None else quantize_tiles(x2)
        y = _fprop(x2, tiles, qw, sw, counts, n).reshape(*x.shape[:-1], n)
        columns = input_columns(x, counts) if for_backward else []  # nothing to keep without grad
        ctx.save_for_backward(qw, sw, *[t for pair in columns for t in pair])
        _remember(ctx, weight, counts)
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_out):
        qw, sw, *flat = ctx.saved_tensors
        columns = list(zip(flat[::2], flat[1::2]))
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _dgrad(g2, qw, sw, ctx.counts, ctx.x_shape[-1], ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        if ctx.needs_input_grad[1]:
            grad_w = _finish_weight_grad(ctx, lambda: _weight_grad(g2, columns, ctx.counts, ctx.weight_shape))
        return grad_x, grad_w, grad_b, None, None, None, None


class FP8SwiGLULinear(torch.autograd.Function):
    """``swiglu(gate, up) @ W^T`` per group of rows, keeping ``gate`` and ``up``
    as 1x128 FP8 tiles and recomputing the SwiGLU in the backward: from the
    dequantized tiles come its output (quantized along T for Wgrad) and the
    gradients of ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx, gate, up, weight, counts, for_backward):
        if gate.shape != up.shape:
            raise ValueError(f"fp8_swiglu_linear: gate {list(gate.shape)} and up {list(up.shape)} differ")
        _check("fp8_swiglu_linear", gate, weight, counts)
        n, k = weight.shape[-2], gate.shape[-1]
        h = swiglu(gate, up).reshape(-1, k)
        qw, sw = weight_blocks(weight)
        y = _fprop(h, quantize_tiles(h), qw, sw, counts, n).reshape(*gate.shape[:-1], n)
        if for_backward:
            ctx.save_for_backward(qw, sw, *quantize_tiles(gate.reshape(-1, k)), *quantize_tiles(up.reshape(-1, k)))
        _remember(ctx, weight, counts)
        ctx.x_shape, ctx.x_dtype = gate.shape, gate.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        qw, sw, gate_data, gate_scales, up_data, up_scales = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        with torch.enable_grad():
            gate = dequantize_tiles(gate_data, gate_scales).to(ctx.x_dtype).requires_grad_()
            up = dequantize_tiles(up_data, up_scales).to(ctx.x_dtype).requires_grad_()
            h = swiglu(gate, up)
        grad_h = _dgrad(g2, qw, sw, ctx.counts, h.shape[-1], ctx.x_dtype)
        grad_gate, grad_up = torch.autograd.grad(h, (gate, up), grad_h)
        grad_w = None
        if ctx.needs_input_grad[2]:
            columns = [quantize_columns(h.detach()[rows]) for _, rows in group_slices(ctx.counts)]
            grad_w = _finish_weight_grad(ctx, lambda: _weight_grad(g2, columns, ctx.counts, ctx.weight_shape))
        return grad_gate.reshape(ctx.x_shape), grad_up.reshape(ctx.x_shape), grad_w, None, None


def _rows(x: torch.Tensor) -> list[int]:
    return [x.numel() // x.shape[-1]]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through the FP8 reference GEMMs; its weight
    gradient can be deferred like :func:`mtrain.runtime.wgrad.linear`'s."""
    return FP8Linear.apply(x, weight, bias, _rows(x), None, None, torch.is_grad_enabled())


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int],
                       x_tiles: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The routed experts' grouped GEMM: rows ``x [R, K]`` grouped by expert
    (``counts[e]`` each) times ``weight[e]^T`` (``[E, N, K]``), equal expert by
    expert to ``fp8_linear(x[rows of e], weight[e])``. ``x_tiles``: ``x``'s
    (fp8 data, fp32 1x128 scales) if already quantized."""
    data, scales = x_tiles if x_tiles is not None else (None, None)
    return FP8Linear.apply(x, weight, None, [int(c) for c in counts], data, scales, torch.is_grad_enabled())


def fp8_swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                      counts: Optional[list[int]] = None) -> torch.Tensor:
    """``swiglu(gate, up) @ weight.T`` (a plain ``[N, K]`` weight), or per
    expert with ``counts`` and ``[E, N, K]`` weights; SwiGLU recomputed in the
    backward from its FP8-kept inputs."""
    counts = _rows(gate) if counts is None else [int(c) for c in counts]
    return FP8SwiGLULinear.apply(gate, up, weight, counts, torch.is_grad_enabled())

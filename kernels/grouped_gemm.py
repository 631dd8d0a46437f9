"""Grouped GEMM for the routed experts, in Triton.

Rows of ``x`` are grouped by expert (``counts[e]`` consecutive rows for expert
``e``). One launch covers every expert:

* :func:`grouped_matmul` — ``out[rows of e] = x[rows of e] @ b[e]`` where ``b``
  is any strided [E, K, N] view. The forward pass uses ``weight.transpose(1, 2)``
  (``x @ W[e]^T``), the input gradient uses ``weight`` itself (``dY @ W[e]``).
  The launch grid is (row tiles of all experts, column tiles); each program
  finds its expert by a binary search of the prefix sums of the per-expert
  row-tile counts.
* :func:`grouped_weight_grad` — ``dw[e] = dy[rows of e]^T @ x[rows of e]``, one
  program per (expert, output tile) looping over that expert's rows.

Accumulation is fp32; inputs may be fp32, bf16 or fp16 and outputs take the
input dtype. Experts with no rows produce no output rows and a zero weight
gradient. Kernels are jitted on first use, once for compiled and once for
interpreted mode (``TRITON_INTERPRET=1``), so one process can run both.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mtrain.kernels import triton_interpreting

# Tile sizes for compiled runs (not tuned yet); tests pass smaller ones so
# that tiny shapes still span several tiles.
MATMUL_BLOCKS = {"block_m": 64, "block_n": 128, "block_k": 32}
WEIGHT_GRAD_BLOCKS = {"block_m": 32, "block_n": 64, "block_k": 64}


def _grouped_matmul_kernel(
    x_ptr, b_ptr, out_ptr, row_offsets_ptr, tile_offsets_ptr,
    num_experts, n_cols, k_dim,
    stride_xr, stride_xk, stride_be, stride_bk, stride_bn, stride_or, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    # This row tile's expert: binary search of the tile prefix sums for the
    # expert e with tile_offsets[e] <= tile < tile_offsets[e + 1] (empty
    # experts own no tiles). Invariant: tile_offsets[lo] <= tile < tile_offsets[hi].
    lo = 0
    hi = num_experts
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(tile_offsets_ptr + mid) <= tile
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    e = lo
    first_tile = tl.load(tile_offsets_ptr + e)
    row_end = tl.load(row_offsets_ptr + e + 1).to(tl.int64)
    row_start = tl.load(row_offsets_ptr + e).to(tl.int64) + (tile - first_tile).to(tl.int64) * BLOCK_M

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    col_ok = cols < n_cols
    x_ptrs = x_ptr + rows[:, None] * stride_xr + ks[None, :] * stride_xk
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = ks + k0 < k_dim
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _grouped_weight_grad_kernel(
    dy_ptr, x_ptr, dw_ptr, row_offsets_ptr,
    n_out, k_in, k_tiles,
    stride_dyr, stride_dyn, stride_xr, stride_xk, stride_we, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    e = tl.program_id(1)
    pid_n = tl.program_id(0) // k_tiles
    pid_k = tl.program_id(0) % k_tiles
    row_start = tl.load(row_offsets_ptr + e).to(tl.int64)
    num_rows = tl.load(row_offsets_ptr + e + 1) - tl.load(row_offsets_ptr + e)

    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < n_out
    k_ok = ks < k_in
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for m0 in range(0, num_rows, BLOCK_M):
        row_ok = m0 + tl.arange(0, BLOCK_M) < num_rows
        rows = row_start + m0 + tl.arange(0, BLOCK_M)
        # dy is read transposed ([BLOCK_N, BLOCK_M]) straight from memory.
        dy_t = tl.load(dy_ptr + ns[:, None] * stride_dyn + rows[None, :] * stride_dyr,
                       mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            dy_t, x = dy_t.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)

    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@functools.cache
def _jitted(interpret: bool):
    # triton.jit picks compiled or interpreted mode when it wraps a function,
    # so keep one wrapped copy per mode. The kernels call Triton builtins only
    # (no triton.language.standard helpers such as tl.sum or tl.zeros): those
    # helpers are wrapped when triton is imported, and the interpreter cannot
    # run them if triton was imported before TRITON_INTERPRET was set.
    del interpret  # only the cache key
    return triton.jit(_grouped_matmul_kernel), triton.jit(_grouped_weight_grad_kernel)


def _dot_options(dtype: torch.dtype, interpret: bool) -> dict:
    """``tl.dot`` settings: follow torch's fp32 matmul setting, so both backends
    agree on TF32; the interpreter has no 16-bit float dot (it would multiply
    the raw bits), so there the operands go to fp32 first — exact, since the
    products of 16-bit floats are exact in fp32 as they are on tensor cores."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpret
    return {"PRECISION": "tf32" if tf32 else "ieee", "UPCAST": interpret and dtype != torch.float32}


def _row_offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    host = torch.tensor(offsets, dtype=torch.int32)
    if device.type != "cuda":
        return host
    # From pinned memory the copy is queued on the stream: the host does not wait for the GPU.
    return host.pin_memory().to(device, non_blocking=True)


def _check(x: torch.Tensor, other: torch.Tensor, counts: list[int]) -> None:
    if x.dtype != other.dtype:
        raise TypeError(f"grouped GEMM needs one dtype, got {x.dtype} and {other.dtype}")
    if sum(counts) != x.shape[0] or any(c < 0 for c in counts):
        raise ValueError(f"counts {counts} do not partition {x.shape[0]} rows")


def grouped_matmul(x: torch.Tensor, b: torch.Tensor, counts: list[int], *,
                   block_m: int = MATMUL_BLOCKS["block_m"], block_n: int = MATMUL_BLOCKS["block_n"],
                   block_k: int = MATMUL_BLOCKS["block_k"]) -> torch.Tensor:
    """``x`` [R, K] grouped by expert times ``b`` [E, K, N] (any strides) -> [R, N]."""
    num_experts, k_dim, n_cols = b.shape
    if len(counts) != num_experts or x.shape[1] != k_dim:
        raise ValueError(f"x {tuple(x.shape)}, b {tuple(b.shape)} and {len(counts)} counts do not match")
    _check(x, b, counts)
    out = x.new_empty(x.shape[0], n_cols)
    tiles_per_expert = [triton.cdiv(c, block_m) for c in counts]
    num_tiles = sum(tiles_per_expert)
    if num_tiles == 0 or n_cols == 0:
        return out
    if k_dim == 0:
        return out.zero_()
    interpret = triton_interpreting()
    matmul_kernel, _ = _jitted(interpret)
    grid = (num_tiles, triton.cdiv(n_cols, block_n))
    matmul_kernel[grid](
        x, b, out, _row_offsets(counts, x.device), _row_offsets(tiles_per_expert, x.device),
        num_experts, n_cols, k_dim,
        x.stride(0), x.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SEARCH_STEPS=max(1, (num_experts - 1).bit_length()), **_dot_options(x.dtype, interpret),
    )
    return out


def grouped_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, counts: list[int], *,
                        block_m: int = WEIGHT_GRAD_BLOCKS["block_m"], block_n: int = WEIGHT_GRAD_BLOCKS["block_n"],
                        block_k: int = WEIGHT_GRAD_BLOCKS["block_k"]) -> torch.Tensor:
    """``dw[e] = grad_out[rows of e]^T @ x[rows of e]`` -> [E, N, K]."""
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} differ in rows")
    _check(x, grad_out, counts)
    num_experts, n_out, k_in = len(counts), grad_out.shape[1], x.shape[1]
    dw = x.new_empty(num_experts, n_out, k_in)
    if dw.numel() == 0:
        return dw
    interpret = triton_interpreting()
    _, weight_grad_kernel = _jitted(interpret)
    k_tiles = triton.cdiv(k_in, block_k)
    grid = (triton.cdiv(n_out, block_n) * k_tiles, num_experts)
    weight_grad_kernel[grid](
        grad_out, x, dw, _row_offsets(counts, x.device),
        n_out, k_in, k_tiles,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_dot_options(x.dtype, interpret),
    )
    return dw

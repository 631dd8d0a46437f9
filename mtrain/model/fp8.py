"""DeepSeek-V3's FP8 recipe (report §3.3) as a plain-PyTorch reference.

The numerics, not the speed: this is what a fine-grained FP8 GEMM computes,
written with torch's ``float8_e4m3fn`` dtype so it runs (slowly) on CPU and is
the reference a GPU backend is compared with (docs/fp8.md).

- Every FP8 tensor is E4M3 (max 448). A tile's fp32 scale is its max-abs / 448
  (1 for an all-zero tile, at least fp32's smallest normal number); the stored
  value is ``x / scale`` rounded to E4M3, and ``fp8 * scale`` gives it back.
- Activations and activation gradients: one scale per 1x128 tile (per row,
  per 128 elements along the GEMM's reduction dimension): :func:`quantize_tiles`.
- Weights: one scale per 128x128 block: :func:`quantize_blocks`. A block
  serves the weight and its transpose, so Dgrad needs no second quantization.
- GEMMs accumulate in fp32, one 128-wide K slice at a time (V3 promotes the
  Tensor Cores' partial sums to fp32 every 128 elements of K, where the
  scales are applied): :func:`fp8_matmul`.

The three GEMMs of a linear ``y = x W^T`` (x ``[T, K]``, W ``[N, K]``), all
written ``a @ b^T`` with both operands' scales running along the reduction:

- Fprop ``y = x W^T``: x in 1x128 tiles along K, W in 128x128 blocks.
- Dgrad ``dx = dy W``: dy in 1x128 tiles along N; W^T ``[K, N]`` is the same
  fp8 data and blocks, transposed.
- Wgrad ``dW = dy^T x``: the reduction runs over the T tokens, so both operands
  are quantized along T: dy^T ``[N, T]`` and x^T ``[K, T]`` in 1x128 tiles along
  T (the 128x1 tiles of the report's backward; Transformer Engine's
  Float8BlockScaling quantizes the wgrad operands "columnwise" alike). Both
  are quantized from the high-precision tensors, not requantized from the
  forward's fp8 tiles.

Ragged edges: K of Fprop (a linear's input features) must be a multiple of 128.
The output features N and the token count T may be ragged: they are padded
with zeros to a multiple of 128 inside :func:`fp8_linear`, which is exactly a
ragged edge tile or block (zeros change neither a tile's max-abs nor a sum),
as in DeepSeek-V3's released weights (``kv_a_proj_with_mqa``: 576 rows).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
BLOCK = 128


def check_multiple(name: str, shape, dims: tuple[int, ...], block: int) -> None:
    bad = [d for d in dims if shape[d] % block]
    if bad:
        raise ValueError(
            f"{name} of shape {list(shape)}: dimension(s) {bad} of size {[shape[d] for d in bad]} are not "
            f"multiples of {block}, the FP8 tile width: pad the tensor or choose widths that are multiples of {block}")


# The smallest scale: fp32's smallest normal number. A tile whose max-abs is
# below 448 x that (subnormal gradients occur) would get a zero scale, and
# 0 / 0 = NaN, or a subnormal one; it gets this scale and its values round to 0.
MIN_SCALE = torch.finfo(torch.float32).tiny


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scales from max-abs values: amax / 448 (at least :data:`MIN_SCALE`),
    and 1 for an all-zero tile."""
    amax = amax.float()
    return torch.where(amax > 0, (amax / FP8_MAX).clamp_min(MIN_SCALE), torch.ones_like(amax))


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Clamp: x / scale can round a hair past 448, and the cast does not saturate.
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_tiles(x: torch.Tensor, tile: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations: one scale per ``1 x tile`` along the last dimension.

    Returns (``float8_e4m3fn`` data of ``x``'s shape, fp32 scales ``[..., K / tile]``).
    """
    check_multiple("activation", x.shape, (x.dim() - 1,), tile)
    xf = x.float()
    tiles = xf.reshape(*x.shape[:-1], x.shape[-1] // tile, tile)
    scales = _scale(tiles.abs().amax(-1))
    return _to_fp8(tiles, scales[..., None]).reshape(x.shape), scales


def dequantize_tiles(data: torch.Tensor, scales: torch.Tensor, tile: int = BLOCK) -> torch.Tensor:
    """fp32 values of :func:`quantize_tiles`'s output."""
    return (data.float() * scales.repeat_interleave(tile, -1))


def quantize_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[N, K]``: one scale per ``block x block``.

    Returns (``float8_e4m3fn`` data ``[N, K]``, fp32 scales ``[N / block, K / block]``).
    """
    if w.dim() != 2:
        raise ValueError(f"weight of shape {list(w.shape)}: expected a 2-D [out_features, in_features] matrix")
    check_multiple("weight", w.shape, (0, 1), block)
    n, k = w.shape
    blocks = w.float().reshape(n // block, block, k // block, block)
    scales = _scale(blocks.abs().amax(dim=(1, 3)))
    return _to_fp8(blocks, scales[:, None, :, None]).reshape(n, k), scales


def dequantize_blocks(data: torch.Tensor, scales: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """fp32 values of :func:`quantize_blocks`'s output."""
    return data.float() * scales.repeat_interleave(block, 0).repeat_interleave(block, 1)


_GPU_GEMM = None  # fp8_matmul on CUDA tensors (train.fp8_backend); None: the reference below everywhere
BACKENDS = ("reference", "scaled_mm")


def use_fp8_backend(name: str, device: torch.device) -> None:
    """Run :func:`fp8_matmul` on ``device`` through ``name``: ``reference`` (the
    fp32 loop below, everywhere) or ``scaled_mm`` (torch's blockwise-scaled
    FP8 GEMM on sm_90, :mod:`mtrain.model.fp8_scaled_mm`). ValueError naming
    ``train.fp8_backend`` when it cannot run there."""
    global _GPU_GEMM
    if name not in BACKENDS:
        raise ValueError(f"train.fp8_backend={name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "reference":
        _GPU_GEMM = None
        return
    from mtrain.model import fp8_scaled_mm

    reason = fp8_scaled_mm.unavailable_reason(torch.device(device))
    if reason is not None:
        raise ValueError(f"train.fp8_backend=scaled_mm cannot run: {reason}; use train.fp8_backend=reference")
    _GPU_GEMM = fp8_scaled_mm.scaled_mm_matmul


def _row_scales(scales: torch.Tensor, rows: int, block: int, name: str) -> torch.Tensor:
    """Per-row scales ``[rows, K / block]`` from 1x128 tile scales (as they are)
    or 128x128 block scales (each block row repeated)."""
    if scales.shape[0] == rows:
        return scales.float()
    if scales.shape[0] * block == rows:
        return scales.float().repeat_interleave(block, 0)
    raise ValueError(f"{name}_scales of shape {list(scales.shape)} fit neither 1x{block} tiles ({rows} rows) nor "
                     f"{block}x{block} blocks ({rows / block:g} rows) of a {rows}-row operand")


def fp8_matmul(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
               out_dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    """``a @ b^T`` as an FP8 GEMM with fp32 accumulation computes it.

    ``a`` ``[M, K]`` and ``b`` ``[N, K]`` are ``float8_e4m3fn``, both with K
    (the reduction) last; each one's scales are ``[rows, K / block]`` (1 x block
    tiles) or ``[rows / block, K / block]`` (block x block blocks). Each
    ``block``-wide K slice is dequantized to fp32 (fp8 value x its scale) and
    multiplied in fp32; the slices' products are summed in fp32, in K order.
    """
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise TypeError(f"fp8_matmul takes {FP8_DTYPE} operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_matmul computes a @ b^T with a [M, K] and b [N, K]: got {list(a.shape)} and "
                         f"{list(b.shape)}")
    check_multiple("fp8_matmul operand a", a.shape, (1,), block)
    if _GPU_GEMM is not None and a.is_cuda:
        return _GPU_GEMM(a, a_scales, b, b_scales, out_dtype, block)
    kb = a.shape[1] // block
    sa = _row_scales(a_scales, a.shape[0], block, "a")
    sb = _row_scales(b_scales, b.shape[0], block, "b")
    if sa.shape[1] != kb or sb.shape[1] != kb:
        raise ValueError(f"scales of shapes {list(a_scales.shape)} and {list(b_scales.shape)} do not have "
                         f"K / {block} = {kb} columns")
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for j in range(kb):
        cols = slice(j * block, (j + 1) * block)
        a_j = a[:, cols].float() * sa[:, j:j + 1]
        b_j = b[:, cols].float() * sb[:, j:j + 1]
        out += a_j @ b_j.t()
    return out.to(out_dtype)


def fp8_rows(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``data[index]`` of an fp8 tensor, moved as bytes: not every device's
    kernels take the float8 dtypes, every one takes uint8."""
    return data.view(torch.uint8).index_select(0, index).view(data.dtype)


def pad_rows(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``x`` with zero rows appended up to a multiple of ``block`` (a ragged edge tile)."""
    extra = -x.shape[0] % block
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def pad_cols(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    extra = -x.shape[1] % block
    return F.pad(x, (0, extra)) if extra else x


def dgrad(g2: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """``dy [T, N] @ W`` (W quantized ``[Np, K]``): dy in 1x128 tiles along N, W^T's blocks. fp32 ``[T, K]``."""
    qg, sg = quantize_tiles(pad_cols(g2))
    return fp8_matmul(qg, sg, qw.t(), sw.t())


def quantize_columns(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wgrad's operand from ``x2 [T, K]``: ``x2^T [K, T]`` in 1x128 tiles along T
    (the report's 128x1 tiles; Transformer Engine's "columnwise" usage), T
    zero-padded to a multiple of 128 for the scales. Returns (fp8 ``[K, T]``,
    the padding left out, fp32 scales ``[K, ceil(T / 128)]``)."""
    t = x2.shape[0]
    data, scales = quantize_tiles(pad_rows(x2).t())
    if data.shape[1] != t:
        data = data.view(torch.uint8)[:, :t].contiguous().view(data.dtype)
    return data, scales


def wgrad(g2: torch.Tensor, x_columns: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``dy^T [N, T] @ x [T, K]`` with x as :func:`quantize_columns` gave it and
    dy quantized alike (T padded with zeros, which quantize to zeros).
    fp32 ``[N, K]``."""
    qg, sg = quantize_tiles(pad_rows(g2).t())
    data, scales = x_columns
    if data.shape[1] != qg.shape[1]:  # as bytes: E4M3's zero is the zero byte
        data = F.pad(data.view(torch.uint8), (0, qg.shape[1] - data.shape[1])).view(data.dtype)
    return fp8_matmul(qg, sg, data, scales)


def quantize_expert_blocks(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights ``[E, N, K]``: each expert's matrix in ``block x block``
    blocks, its N zero-padded to a multiple of ``block`` (as :func:`quantize_blocks`
    of :func:`pad_rows`). Returns (fp8 ``[E, Np, K]``, fp32 scales
    ``[E, Np / block, K / block]``), element for element what
    :func:`quantize_blocks` gives each padded expert."""
    if weight.dim() != 3:
        raise ValueError(f"expert weights of shape {list(weight.shape)}: expected [experts, out_features, "
                         f"in_features]")
    check_multiple("expert weight", weight.shape, (2,), block)
    e, n, k = weight.shape
    w = F.pad(weight.detach(), (0, 0, 0, -n % block))
    np_ = w.shape[1]
    blocks = w.float().reshape(e, np_ // block, block, k // block, block)
    scales = _scale(blocks.abs().amax(dim=(2, 4)))
    return _to_fp8(blocks, scales[:, :, None, :, None]).reshape(e, np_, k), scales

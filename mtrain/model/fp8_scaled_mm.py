"""torch's blockwise-scaled FP8 GEMM as a backend of the FP8 reference
(``train.fp8_backend=scaled_mm``, docs/fp8.md).

``torch._scaled_mm`` runs cuBLASLt's DeepSeek-style scaling on sm_90 (CUDA
12.9 or later): the first operand in 1x128 tiles, the second in 128x128
blocks (Fprop, Dgrad) or 1x128 tiles (Wgrad), fp32 scales, partial sums
promoted per 128 of K. :func:`scaled_mm_matmul` takes the operands exactly
as :func:`mtrain.model.fp8.fp8_matmul` does and lays them out as cuBLASLt
wants them:

- the second operand column-major (``b [N, K]`` row-major is ``b^T`` column-major);
- tile scales ``[rows, K/128]`` column-major;
- block scales as ``[round_up(K/128, 4), N/128]`` column-major (the K blocks
  padded to a multiple of 4 with unused ones);
- the first operand's rows padded with zeros to a multiple of 16.

The result is taken in bf16 (the output cuBLASLt's blockwise kernels write)
and returned in the requested dtype, so it differs from the reference by a
bf16 rounding and the summation order within 128 of K.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ROW_MULTIPLE = 16


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why this backend cannot run on ``device`` (None: it can)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"it runs on CUDA GPUs and this run's device is {device}"
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"torch's blockwise FP8 scaling needs an sm_90 GPU (Hopper); {torch.cuda.get_device_name(device)} " \
               f"is sm_{major}{minor}"
    return None


def _column_major(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous().t()


def _tile_scales(scales: torch.Tensor, rows: int, block: int) -> torch.Tensor:
    """1x128 scales ``[rows, K/128]`` from tile or block scales."""
    scales = scales.float()
    return scales if scales.shape[0] == rows else scales.repeat_interleave(block, 0)[:rows]


def _block_scales(scales: torch.Tensor) -> torch.Tensor:
    """cuBLASLt's layout of 128x128 scales ``[N/128, K/128]``."""
    n_blocks, k_blocks = scales.shape
    padded = torch.ones(n_blocks, -(-k_blocks // 4) * 4, dtype=torch.float32, device=scales.device)
    padded[:, :k_blocks] = scales.float()
    return padded.t()


def scaled_mm_matmul(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                     out_dtype: torch.dtype = torch.float32, block: int = 128) -> torch.Tensor:
    """``a @ b^T`` (``a [M, K]``, ``b [N, K]``, float8_e4m3fn) with the scales
    of :func:`mtrain.model.fp8.fp8_matmul`, on torch's scaled matmul."""
    m, n = a.shape[0], b.shape[0]
    sa = _tile_scales(a_scales, m, block)
    extra = -m % ROW_MULTIPLE
    if extra:
        a = torch.cat([a, torch.zeros(extra, a.shape[1], dtype=a.dtype, device=a.device)])
        sa = F.pad(sa, (0, 0, 0, extra), value=1.0)
    if b_scales.shape[0] == n:
        sb = _column_major(b_scales.float())
    else:
        sb = _block_scales(b_scales)
    out = torch._scaled_mm(a, b.contiguous().t(), scale_a=_column_major(sa), scale_b=sb,
                           out_dtype=torch.bfloat16, use_fast_accum=False)
    return out[:m].to(out_dtype)

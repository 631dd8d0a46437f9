"""Rotary position embedding of the decoupled rope dims, with YaRN extension.

Conventions (as DeepSeek-V3):

* Rotation pairs are *interleaved*: dims ``(2i, 2i+1)`` of a head form the
  i-th complex number and rotate by ``pos * freq_i``. (Checkpoints that use
  the half-rotation layout differ only by a fixed permutation of the rope
  dims inside ``q_b``/``kv_a`` weights.)
* :func:`rope_tables` returns half-dim tables: ``cos``/``sin`` of shape
  ``[seq_len, qk_rope_head_dim // 2]``, one entry per pair.
* YaRN (``rope_scaling_factor > 1``): frequencies that turn more than
  ``beta_fast`` times over the original context are kept, those that turn
  fewer than ``beta_slow`` times are divided by the factor, with a linear
  ramp over the pair indices in between. Attention
  logits are then scaled by ``yarn_mscale(factor, mscale_all_dim)**2`` in
  :func:`softmax_scale`; the tables carry the remaining ratio
  ``yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)``
  (1 for DeepSeek-V3, where both are 1).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(factor) + 1`` (1 when not extended)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_len: int) -> float:
    """The (fractional) pair index whose frequency turns ``num_rotations`` times over ``original_len``."""
    return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_len: int) -> tuple[int, int]:
    """Pair indices ``(low, high)``: at or below ``low`` frequencies are kept, from ``high`` on interpolated."""
    low = math.floor(yarn_correction_dim(beta_fast, dim, base, original_len))
    high = math.ceil(yarn_correction_dim(beta_slow, dim, base, original_len))
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """0 up to ``low``, rising linearly to 1 at ``high``, over pair indices ``0..n-1``."""
    if low == high:
        high += 0.001  # avoid a division by zero; the ramp becomes a step
    ramp = (torch.arange(n, dtype=torch.float64) - low) / (high - low)
    return ramp.clamp(0.0, 1.0)


def rope_frequencies(cfg) -> torch.Tensor:
    """Angular frequency of every rotation pair, ``[qk_rope_head_dim // 2]`` (fp64), YaRN-adjusted."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = cfg.rope_scaling_factor
    if factor <= 1.0:
        return freqs
    low, high = yarn_correction_range(cfg.yarn_beta_fast, cfg.yarn_beta_slow, dim, base,
                                      cfg.rope_original_max_seq_len)
    interpolate = yarn_ramp(low, high, dim // 2)  # 1: fully divided by the factor
    return freqs / factor * interpolate + freqs * (1.0 - interpolate)


def rope_tables(cfg, seq_len: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` for positions ``0..seq_len-1``, each ``[seq_len, qk_rope_head_dim // 2]`` fp32."""
    factor = cfg.rope_scaling_factor
    amplitude = yarn_mscale(factor, cfg.yarn_mscale) / yarn_mscale(factor, cfg.yarn_mscale_all_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), rope_frequencies(cfg))
    cos = (angles.cos() * amplitude).to(torch.float32)
    sin = (angles.sin() * amplitude).to(torch.float32)
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [..., seq, heads, rope_dim]`` by the tables ``[seq, rope_dim // 2]``.

    Computed in fp32, returned in ``x``'s dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def softmax_scale(cfg) -> float:
    """``1 / sqrt(qk_nope + qk_rope)``, times ``yarn_mscale(factor, mscale_all_dim)^2`` when extended."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    m = yarn_mscale(cfg.rope_scaling_factor, cfg.yarn_mscale_all_dim)
    return scale * m * m

"""What one training step reports: throughput and MFU, expert load balance,
peak memory, and the record that holds them (see docs/metrics.md).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import resource
import sys
from collections.abc import Mapping
from typing import Optional

import torch

# Peak dense bf16 TFLOP/s of one device, matched case-insensitively against
# ``torch.cuda.get_device_name()``; the first pattern found in the name wins,
# so the specific variants come before the family name.
DEVICE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM and GH200
    ("A100", 312.0),
)


def device_peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of a device by its CUDA name; None when unknown
    (CPUs, GPUs not in :data:`DEVICE_PEAK_TFLOPS`)."""
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, peak in DEVICE_PEAK_TFLOPS:
        if pattern.lower() in name:
            return peak
    return None


@functools.lru_cache(maxsize=1)
def local_device_peak_tflops() -> Optional[float]:
    """Peak of this process's CUDA device (None on CPU)."""
    return device_peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak_tflops: Optional[float]) -> dict[str, Optional[float]]:
    """Speed of one step that processed ``tokens`` tokens (the global batch) in
    ``seconds`` on ``world_size`` devices.

    tokens_per_s = tokens / seconds;
    tflops_per_device = flops_per_token · tokens_per_s / world_size / 1e12
    (model FLOPs: recomputation and pipeline duplicates are not counted);
    mfu = tflops_per_device / peak_tflops. ``peak_tflops`` None falls back to
    the local device's table entry; mfu is None when that is unknown too.
    """
    tokens_per_s = tokens / seconds
    tflops = flops_per_token * tokens_per_s / world_size / 1e12
    peak = peak_tflops if peak_tflops is not None else local_device_peak_tflops()
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None}


def expert_load_imbalance(loads: torch.Tensor) -> list[float]:
    """Max over mean of the tokens each expert received, per MoE layer.

    ``loads`` is [layers, experts]; 1.0 is perfect balance, ``experts`` is every
    token on one expert. A layer that received no tokens has no balance: NaN.
    """
    loads = loads.to(torch.float64)
    mean = loads.mean(dim=1)
    ratio = loads.max(dim=1).values / mean
    return [r if m > 0 else math.nan for r, m in zip(ratio.tolist(), mean.tolist())]


def peak_memory_bytes() -> int:
    """Peak memory of this process: the CUDA caching allocator's maximum
    allocated bytes when this process has used CUDA, else the process's maximum
    resident set size (RSS, which also counts the Python interpreter and
    libraries, so it is not comparable to the CUDA number)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


@dataclasses.dataclass
class StepMetrics:
    """One step's record: the keys of metrics.jsonl and of the wandb history.

    Losses are means over the global batch. ``step`` counts completed optimizer
    steps (1 for the first); ``lr`` is the rate that step used. A ``skipped`` step
    had a non-finite loss or gradient norm and made no update.
    """

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    tflops_per_device: float
    peak_memory_gb: float
    step_time_s: float
    skipped: bool = False
    lm_loss: Optional[float] = None
    mtp_loss: Optional[float] = None
    aux_loss: Optional[float] = None
    mfu: Optional[float] = None
    bubble_pct: Optional[float] = None
    expert_load_imbalance: Optional[float] = None  # max over MoE layers
    expert_load_imbalance_per_layer: Optional[dict[str, float]] = None  # MoE layer name -> max/mean

    @classmethod
    def from_mapping(cls, values: Mapping) -> "StepMetrics":
        """Build from a dict, rejecting unknown keys (a misspelt metric would
        otherwise vanish silently) and naming the missing ones."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown step metrics {unknown}; known: {sorted(fields)}")
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"incomplete step metrics: {e}") from None

    def as_record(self) -> dict:
        """A JSON-safe dict: non-finite numbers (a skipped step's loss) become None."""
        return {k: _finite_or_none(v) for k, v in dataclasses.asdict(self).items()}


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

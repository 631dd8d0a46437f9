"""What one training step reports: throughput and MFU, expert load balance,
peak memory, which GEMMs run in FP8, and the record that holds them (see
docs/metrics.md).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import resource
import sys
import time
from collections.abc import Mapping
from typing import Optional

import torch

# Peak dense (no sparsity) tensor-core TFLOP/s of one device per dtype trained
# in, matched case-insensitively against ``torch.cuda.get_device_name()``; the
# first pattern found in the name wins, so the specific variants come before
# the family name. fp32 runs use the TF32 peak: the trainer turns TF32 on for
# fp32 matmuls on CUDA. The figures are half of the with-sparsity figures of
# NVIDIA's datasheets: H100 and H800 (SXM: BF16 1979, TF32 989; PCIe: 1513,
# 756; H100 NVL: 1671, 835), H200 (SXM: 1979, 989; NVL: 1671, 835), A100
# (BF16 624, TF32 312; the dense 312 and 156 are printed beside them).
DEVICE_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 417.5}),
    ("H100", {"bf16": 989.0, "fp32": 494.5}),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200 NVL", {"bf16": 835.0, "fp32": 417.5}),
    ("H200", {"bf16": 989.0, "fp32": 494.5}),  # SXM and GH200
    ("H800 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H800", {"bf16": 989.0, "fp32": 494.5}),  # SXM
    ("A100", {"bf16": 312.0, "fp32": 156.0}),  # SXM and PCIe
)


def device_peak_tflops(device_name: Optional[str], dtype: str = "bf16") -> Optional[float]:
    """Peak dense TFLOP/s of a device by its CUDA name for training in ``dtype``
    (bf16, or fp32 as TF32); None when unknown (CPUs, GPUs not in
    :data:`DEVICE_PEAK_TFLOPS`)."""
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, peaks in DEVICE_PEAK_TFLOPS:
        if pattern.lower() in name:
            return peaks[str(dtype)]
    return None


@functools.lru_cache(maxsize=None)
def local_device_peak_tflops(dtype: str = "bf16") -> Optional[float]:
    """Peak of this process's CUDA device for ``dtype`` (None on CPU)."""
    return device_peak_tflops(torch.cuda.get_device_name(), dtype) if torch.cuda.is_available() else None


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak_tflops: Optional[float], dtype: str = "bf16") -> dict[str, Optional[float]]:
    """Speed of one step that processed ``tokens`` tokens (the global batch) in
    ``seconds`` on ``world_size`` devices, training in ``dtype``.

    tokens_per_s = tokens / seconds;
    tflops_per_device = flops_per_token · tokens_per_s / world_size / 1e12
    (model FLOPs: recomputation and pipeline duplicates are not counted);
    mfu = tflops_per_device / peak_tflops. ``peak_tflops`` None falls back to
    the local device's table entry for ``dtype``; mfu is None when that is
    unknown too.
    """
    tokens_per_s = tokens / seconds
    tflops = flops_per_token * tokens_per_s / world_size / 1e12
    peak = peak_tflops if peak_tflops is not None else local_device_peak_tflops(str(dtype))
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None}


class StepTimer:
    """Duration of a training step. On CUDA, events recorded on the current
    stream at the start and the end, so the time is the device's (kernels
    launched by the end of the step have finished) and reading it costs no
    extra host round trip after the step's last sync; on CPU, perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        """Mark the end of the step; read it with :meth:`seconds` later."""
        if self.cuda:
            self._end.record()
        else:
            self._elapsed = time.perf_counter() - self._t0

    def seconds(self) -> float:
        if self.cuda:
            self._end.synchronize()  # returns at once when a later sync already waited for it
            return self._start.elapsed_time(self._end) / 1e3
        return self._elapsed


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
    # MiB rank 0 sent for the replicas' gradient sums and ZeRO-1's weight all-gather (ring count).
    grad_sync_mb: Optional[float] = None
    expert_load_imbalance: Optional[float] = None  # max over MoE layers
    expert_load_imbalance_per_layer: Optional[dict[str, float]] = None  # MoE layer name -> max/mean
    global_batch_size: Optional[int] = None  # sequences in this step (a batch-size ramp changes it)
    consumed_samples: Optional[int] = None  # global samples consumed after this step
    blend_samples: Optional[dict[str, int]] = None  # data.blend: samples drawn from each dataset so far
    # The run's first record: GEMM sites per family of the built model that run FP8 /
    # stay in high precision (:func:`gemm_precision_census`).
    fp8_gemms: Optional[dict[str, int]] = None
    high_precision_gemms: Optional[dict[str, int]] = None

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


# GEMM families of the model, by where a GEMM site sits (docs/fp8.md).
FP8_CAPABLE_FAMILIES = ("attention_proj", "dense_mlp", "shared_experts", "routed_experts", "mtp_proj",
                        "dispatch_payload")
HIGH_PRECISION_FAMILIES = ("embedding", "output_head", "router", "attention_core")


def _linear_family(parents: list) -> str:
    """Family of a dense linear from the modules above it (nearest last)."""
    from mtrain.model.attention import MLAttention
    from mtrain.model.mlp import DenseMLP
    from mtrain.model.model import MTPModule
    from mtrain.model.moe.layer import MoELayer

    kinds = [type(p) for p in parents]
    if MLAttention in kinds:
        return "attention_proj"
    if DenseMLP in kinds:
        return "shared_experts" if MoELayer in kinds else "dense_mlp"
    if kinds and kinds[-1] is MTPModule:
        return "mtp_proj"
    return "other_linear"


def gemm_precision_census(modules) -> dict[str, dict[str, int]]:
    """Which GEMM sites of the built ``modules`` (a model chunk or a list of
    them) run FP8, read from the modules themselves: every dense linear by its
    ``fp8`` flag, the routed experts (gate, up and down: three sites per MoE
    layer) by theirs, the dispatch payload (one per MoE layer) by its
    dispatcher's; embedding, output head, router and the attention core (one
    site each per module) are high precision by design.

    Returns ``{"fp8_gemms": {family: sites}, "high_precision_gemms": {family: sites}}``.
    """
    from mtrain.model.attention import MLAttention
    from mtrain.model.moe.experts import GroupedExperts
    from mtrain.model.moe.layer import MoELayer
    from mtrain.model.moe.router import Router
    from mtrain.model.tp import (ColumnParallelLinear, ParallelLMHead, ReplicatedLinear, RowParallelLinear,
                                 VocabParallelEmbedding)

    linears = (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear)
    out = {"fp8_gemms": {}, "high_precision_gemms": {}}

    def add(family: str, fp8: bool, sites: int = 1) -> None:
        side = out["fp8_gemms" if fp8 else "high_precision_gemms"]
        side[family] = side.get(family, 0) + sites

    def visit(module, parents: list) -> None:
        if isinstance(module, linears):
            add(_linear_family(parents), bool(module.fp8))
        elif isinstance(module, GroupedExperts):
            add("routed_experts", bool(module.fp8), 3)
        elif isinstance(module, VocabParallelEmbedding):
            add("embedding", False)
        elif isinstance(module, ParallelLMHead):
            add("output_head", False)
        elif isinstance(module, Router):
            add("router", False)
        elif isinstance(module, MLAttention):
            add("attention_core", False)
        elif isinstance(module, MoELayer):
            add("dispatch_payload", bool(getattr(module.dispatcher, "fp8", False)))
        for child in module.children():
            visit(child, parents + [module])

    for m in (modules if isinstance(modules, (list, tuple)) else [modules]):
        visit(m, [])
    return out


def merge_censuses(censuses) -> dict[str, dict[str, int]]:
    """Sum of :func:`gemm_precision_census` results (e.g. of the pipeline stages)."""
    out = {"fp8_gemms": {}, "high_precision_gemms": {}}
    for census in censuses:
        for side, families in census.items():
            for family, sites in families.items():
                out[side][family] = out[side].get(family, 0) + sites
    return out

"""A cluster's GPUs as the cost model sees them: peaks and bandwidths from the
``cluster`` profile (``configs/cluster/``), scaled by the efficiencies
real kernels reach (``cluster.efficiency``)."""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 2**30
TERA = 1e12
RESERVED_BYTES = 6 * GIB  # CUDA context, NCCL/DeepEP buffers, allocator slack: not for the model
LINK_LATENCY_S = 10e-6  # one message's fixed cost on NVLink or InfiniBand

REQUIRED = ("bf16_tflops", "fp8_tflops", "hbm_gib", "hbm_gbps", "nvlink_gbps", "ib_gbps", "sms")


class ProfileError(ValueError):
    """The cluster profile lacks what the cost model needs."""


@dataclass(frozen=True)
class Hardware:
    name: str
    nodes: int
    gpus_per_node: int
    bf16_flops: float  # achieved FLOP/s of large bf16 GEMMs
    fp8_flops: float  # achieved FLOP/s of blockwise FP8 GEMMs
    attention_flops: float  # achieved FLOP/s of the fused attention core
    memory_bw: float  # achieved bytes/s of memory-bound ops
    nvlink_bw: float  # achieved bytes/s to a GPU of the same node
    ib_bw: float  # achieved bytes/s to another node
    hbm_bytes: float  # for the model: HBM less RESERVED_BYTES
    peak_bf16_flops: float  # for MFU
    sms: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def link_bw(self, crosses_nodes: bool) -> float:
        return self.ib_bw if crosses_nodes else self.nvlink_bw


def profile_errors(cluster) -> list[str]:
    missing = [f"cluster.gpu.{k}" for k in REQUIRED if getattr(cluster.gpu, k) is None]
    if not missing:
        return []
    return [f"{', '.join(missing)} not set: the cost model needs a GPU profile; choose one "
            f"(cluster=h800, cluster=h100 or cluster=h200, with cluster.nodes=N) or set the fields"]


def hardware(cluster) -> Hardware:
    """The :class:`Hardware` of a ``cluster`` config; :class:`ProfileError` when incomplete."""
    errors = profile_errors(cluster)
    if errors:
        raise ProfileError(errors[0])
    g, e = cluster.gpu, cluster.efficiency
    return Hardware(
        name=g.name or "unnamed GPU", nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node,
        bf16_flops=g.bf16_tflops * TERA * e.gemm, fp8_flops=g.fp8_tflops * TERA * e.fp8_gemm,
        attention_flops=g.bf16_tflops * TERA * e.attention, memory_bw=g.hbm_gbps * GB * e.memory,
        nvlink_bw=g.nvlink_gbps * GB * e.network, ib_bw=g.ib_gbps * GB * e.network,
        hbm_bytes=g.hbm_gib * GIB - RESERVED_BYTES, peak_bf16_flops=g.bf16_tflops * TERA, sms=int(g.sms),
    )

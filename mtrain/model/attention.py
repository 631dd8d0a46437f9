"""Multi-head Latent Attention (DeepSeek-V2/V3), heads split over tensor parallelism.

Queries: ``x -> q_a -> RMSNorm -> q_b`` (or ``x -> q_proj`` when
``q_lora_rank == 0``), per head ``[nope | rope]``. Keys and values:
``x -> kv_a -> [latent | k_pe]``; the latent goes through RMSNorm and ``kv_b``
to per-head ``[k_nope | v]``, while ``k_pe`` (one rope key shared by all
heads) is rotated and broadcast. The down-projections and norms are
replicated on the TP ranks; ``q_b``, ``kv_b`` are column-parallel (whole heads
per rank) and ``o_proj`` row-parallel. Every replicated tensor entering the
per-head computation (the normed latents inside the column layers, and
``k_pe``) passes through ``copy_to_tp``, so the gradients of the replicated
weights and of the layer input are complete and equal on all TP ranks.

Selective recompute (``cfg.recompute == "selective"``) keeps only the
latents and ``k_pe``: the latent norms, the up-projections and the core's
inputs built from them (q, k and v, which the attention core would keep)
are recomputed just before the core's backward, into the storage the core
saved (:class:`mtrain.runtime.rebuild.Rebuilt`), as DeepSeek-V3 recomputes
its RMSNorm and MLA up-projections.

The attention core is ``scaled_dot_product_attention``. Its fused (flash)
kernels, on CUDA and on CPU, need the value head dim equal to the query/key
one (MLA: 128 against 192 at V3); otherwise torch falls back to a kernel that
keeps the [S, S] score matrix. So the values are zero-padded to the query/key
dim and the output sliced back: the same result and gradients (the padded
columns are zero and carry no gradient), with the fused kernel eligible.
:class:`MLAttention` logs once which form runs.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

from mtrain.model.compiled import compiled
from mtrain.model.norm import RMSNorm
from mtrain.model.rope import apply_rope, softmax_scale
from mtrain.model.tp import (ColumnParallelLinear, Group, ReplicatedLinear, RowParallelLinear, copy_to_tp, divide,
                             tp_size)
from mtrain.runtime.rebuild import Rebuilt

log = logging.getLogger(__name__)

# DeepSeek-V3 normalises the q and kv latents with RMSNorm's default epsilon,
# whatever the model's rms_norm_eps (which the layer norms use).
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    def __init__(self, cfg, tp_group: Group = None, fp8: bool = False):
        """``fp8``: the five projections' GEMMs are FP8 (docs/fp8.md); the norms and the core are not."""
        super().__init__()
        self.tp_group = tp_group
        self.num_local_heads = divide(cfg.num_heads, tp_size(tp_group), "model.num_heads")
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = softmax_scale(cfg)
        self.selective_recompute = cfg.recompute == "selective"
        hidden, std, heads = cfg.hidden_size, cfg.init_std, cfg.num_heads
        qk_dim = self.nope_dim + self.rope_dim

        self.compresses_queries = cfg.q_lora_rank > 0
        if self.compresses_queries:
            self.q_a = ReplicatedLinear(hidden, cfg.q_lora_rank, std, fp8=fp8)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, cfg.compile)
            self.q_b = ColumnParallelLinear(cfg.q_lora_rank, heads * qk_dim, tp_group, std, fp8=fp8)
        else:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_dim, tp_group, std, fp8=fp8)
        self.kv_a = ReplicatedLinear(hidden, cfg.kv_lora_rank + self.rope_dim, std, fp8=fp8)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, cfg.compile)
        self.kv_b = ColumnParallelLinear(cfg.kv_lora_rank, heads * (self.nope_dim + self.v_dim), tp_group, std,
                                         fp8=fp8)
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, tp_group, std, fp8=fp8)
        self._heads = compiled(attention_heads, cfg.compile)

    def _up_project(self, q_in: torch.Tensor, kv_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Norms and up-projections: the part selective recompute recomputes."""
        q = self.q_b(self.q_a_norm(q_in)) if self.compresses_queries else self.q_proj(q_in)
        kv = self.kv_b(self.kv_a_norm(kv_latent))
        return q, kv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [B, S, hidden]`` (replicated over TP) -> ``[B, S, hidden]``; ``cos``/``sin`` from ``rope_tables``."""
        q_in = self.q_a(x) if self.compresses_queries else x
        kv_latent, k_pe = self.kv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        # k_pe feeds only this rank's heads: sum its gradient over the TP ranks.
        k_pe = copy_to_tp(k_pe, self.tp_group)

        _log_attention_form(x.device.type, self.v_dim < self.nope_dim + self.rope_dim, self.v_dim,
                            self.nope_dim + self.rope_dim)
        if self.selective_recompute and torch.is_grad_enabled():
            return self.o_proj(self._rebuilt_core(q_in, kv_latent, k_pe, cos, sin))
        q, kv = self._up_project(q_in, kv_latent)
        out = self._heads(q, kv, k_pe, cos, sin, self.num_local_heads, self.nope_dim, self.rope_dim, self.v_dim,
                          self.scale)
        return self.o_proj(out)

    def _rebuilt_core(self, q_in, kv_latent, k_pe, cos, sin) -> torch.Tensor:
        """The attention core on q, k and v that are dropped after its forward
        and rebuilt from the latents before its backward (selective recompute)."""
        def build(q_in, kv_latent, k_pe):
            q, kv = self._up_project(q_in, kv_latent)
            return core_inputs(q, kv, k_pe, cos, sin, self.num_local_heads, self.nope_dim, self.rope_dim, self.v_dim)

        rebuilt = Rebuilt(build)
        q, k, v = rebuilt(q_in, kv_latent, k_pe)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        rebuilt.release_after(out, (q, k, v))
        return merge_heads(out, self.v_dim)


def core_inputs(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                heads: int, nope_dim: int, rope_dim: int, v_dim: int) -> tuple[torch.Tensor, ...]:
    """The attention core's q, k and v ``[B, heads, S, dim]`` from the
    up-projections' outputs: split the heads, rotate the rope parts, the
    values zero-padded to the query/key dim (the fused kernel's form)."""
    batch, seq = q.shape[:2]
    q_nope, q_pe = q.view(batch, seq, heads, -1).split([nope_dim, rope_dim], dim=-1)
    k_nope, v = kv.view(batch, seq, heads, -1).split([nope_dim, v_dim], dim=-1)
    q_pe = apply_rope(q_pe, cos, sin)
    k_pe = apply_rope(k_pe.view(batch, seq, 1, rope_dim), cos, sin)
    q = torch.cat([q_nope, q_pe], dim=-1)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, heads, -1)], dim=-1)
    if v_dim < nope_dim + rope_dim:
        v = F.pad(v, (0, nope_dim + rope_dim - v_dim))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention_heads(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    heads: int, nope_dim: int, rope_dim: int, v_dim: int, scale: float) -> torch.Tensor:
    """Everything between the up-projections and ``o_proj``: :func:`core_inputs`,
    causal attention; ``[B, S, heads * v_dim]``."""
    out = F.scaled_dot_product_attention(*core_inputs(q, kv, k_pe, cos, sin, heads, nope_dim, rope_dim, v_dim),
                                         is_causal=True, scale=scale)
    return merge_heads(out, v_dim)


def merge_heads(out: torch.Tensor, v_dim: int) -> torch.Tensor:
    """The core's output ``[B, heads, S, dim]`` (values padded to ``dim``) -> ``[B, S, heads * v_dim]``."""
    batch, heads, seq = out.shape[:3]
    return out[..., :v_dim].transpose(1, 2).reshape(batch, seq, heads * v_dim)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   pad_values: bool = True) -> torch.Tensor:
    """Causal attention of ``[B, heads, S, dim]`` tensors; the value dim may be
    smaller than the query/key dim. ``pad_values`` pads the values to the
    query/key dim so a fused kernel can run."""
    v_dim, qk_dim = v.shape[-1], q.shape[-1]
    pad = pad_values and v_dim < qk_dim
    if not pad:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, qk_dim - v_dim)), is_causal=True, scale=scale)
    return out[..., :v_dim]


@functools.cache
def _log_attention_form(device: str, pad: bool, v_dim: int, qk_dim: int) -> None:
    how = (f"values padded {v_dim}->{qk_dim} so a fused (flash) kernel is eligible" if pad
           else f"query/key dim {qk_dim}, value dim {v_dim}: torch picks the kernel")
    log.info("attention on %s: scaled_dot_product_attention, %s", device, how)

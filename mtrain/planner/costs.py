"""Seconds per pipeline op: the forward (F), input gradient (I) and weight
gradient (W) of one stage for one micro-batch on one GPU, from the model's
shapes, the layout and a :class:`~mtrain.planner.hardware.Hardware`.

A roofline, piece by piece (docs/planning.md):

- GEMMs: FLOPs over the achieved GEMM rate, FP8 for the linears and the
  routed experts under ``train.fp8=blockwise`` (DeepSeek-V3's recipe), bf16
  for the output head and the router. Dgrad and Wgrad each repeat the
  forward's FLOPs.
- Attention core: FLOPs over the achieved fused-attention rate; its backward
  is 2.5 times the forward (five products against two).
- Memory-bound work (norms, rope, SwiGLU, softmax of the head): the
  activation bytes each block keeps (``mtrain.model.stats``), written and
  read once, over the achieved HBM bandwidth; twice that in the backward.
- Tensor parallelism: two all-reduces of the hidden state per block each way.
- The expert exchange: dispatch (the token with its gates; FP8 with its
  scales under FP8, as ``mtrain.model.moe.fp8_dispatch`` sends it) and combine (bf16)
  in the forward, both bf16 in the backward, with the sends per token of
  :mod:`mtrain.planner.traffic` (the model's routing of random affinities);
  the two hops run concurrently, so an
  exchange takes the longer of its InfiniBand and NVLink parts. It is kept
  apart (``F_comm``/``B_comm``): an overlapped F&B pair hides it behind the
  other side's compute (:func:`mtrain.pipeline.simulate.pair_cost`).
- Recompute: selective redoes the latent up-projections in the backward;
  full redoes the whole forward.

With a GPU-driven exchange (DeepEP) its SMs (``parallel.deepep_num_sms``) are
taken from the compute of every MoE stage.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mtrain.model.moe.fp8_dispatch import payload_row_bytes
from mtrain.model.stats import (attention_core_flops, attention_params, attention_replicated_params,
                                layer_activation_elements, mtp_module_pieces, has_moe, swiglu_params)
from mtrain.planner.hardware import LINK_LATENCY_S, Hardware
from mtrain.planner.traffic import destinations

ATTENTION_BACKWARD = 2.5  # backward / forward FLOPs of the fused attention core


@dataclass
class Work:
    """Forward work of one stage for one micro-batch on one GPU."""

    linear_flops: float = 0.0  # GEMMs in FP8 under train.fp8=blockwise
    routed_flops: float = 0.0  # the routed experts' grouped GEMMs
    bf16_flops: float = 0.0  # GEMMs kept in high precision (head, router)
    attention_flops: float = 0.0
    memory_bytes: float = 0.0
    tp_bytes: float = 0.0  # all-reduced bytes (ring: 2 (tp-1)/tp of them cross each link)
    recompute_flops: float = 0.0  # linear GEMM FLOPs redone in the backward (selective)
    moe_layers: int = 0

    def add(self, other: "Work") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class Setting:
    """What the costs depend on beyond the model: per-GPU tokens and the layout."""

    tokens: int  # tokens of one micro-batch (micro_batch_size x seq_len)
    seq_len: int
    tp: int
    ep: int
    expert_tp: int
    ep_per_node: int
    hops: int
    fp8: bool
    recompute: str
    dtype_bytes: int
    exchange_sms: int  # SMs the exchange takes from compute (0: none)


def block_work(m, s: Setting, dense: bool) -> Work:
    """One transformer block (MLA + dense or MoE MLP)."""
    t, tp = s.tokens, s.tp
    replicated = attention_replicated_params(m)
    w = Work(linear_flops=2 * t * (replicated + (attention_params(m) - replicated) / tp),
             attention_flops=t * attention_core_flops(m, s.seq_len) / tp)
    if dense:
        w.linear_flops += 2 * t * swiglu_params(m.hidden_size, m.ffn_hidden_size) / tp
    else:
        w.linear_flops += 2 * t * swiglu_params(m.hidden_size, m.num_shared_experts * m.moe_ffn_hidden_size) / tp
        w.bf16_flops += 2 * t * m.num_routed_experts * m.hidden_size
        # Balanced routing: every GPU computes as many expert rows as its tokens send.
        w.routed_flops += 2 * (t / tp) * m.moe_topk * swiglu_params(m.hidden_size, m.moe_ffn_hidden_size)
        w.moe_layers = 1
    # The elementwise ops' traffic: what a block produces, whatever recompute keeps of it.
    elements = layer_activation_elements(m, dense, tp, s.expert_tp, recompute="none")
    w.memory_bytes = 2 * elements * t * s.dtype_bytes
    if tp > 1:
        w.tp_bytes = 2 * t * m.hidden_size * s.dtype_bytes
    if s.recompute == "selective":
        qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
        up = m.q_lora_rank * m.num_heads * qk_head + m.kv_lora_rank * m.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
        w.recompute_flops = 2 * t * up / tp
    return w


def head_work(m, s: Setting) -> Work:
    """The output head and its fp32 softmax/cross-entropy."""
    vocab = m.vocab_size / s.tp
    return Work(bf16_flops=2 * s.tokens * m.hidden_size * vocab, memory_bytes=3 * s.tokens * vocab * 4)


def stage_work(m, s: Setting, stage: dict) -> Work:
    """A stage chunk: its layers, and the embedding, head and MTP modules it holds."""
    w = Work()
    for layer in stage["layers"]:
        w.add(block_work(m, s, dense=layer < m.first_k_dense))
    if stage["embedding"]:
        w.memory_bytes += 2 * s.tokens * m.hidden_size * s.dtype_bytes
    if stage["head"]:
        w.add(head_work(m, s))
    if stage["mtp"]:
        for _ in range(m.mtp_depth):
            w.add(block_work(m, s, dense=not has_moe(m)))
            w.linear_flops += 2 * s.tokens * mtp_module_pieces(m)["projection"]
            w.add(head_work(m, s))
    return w


def exchange_seconds(m, s: Setting, hw: Hardware) -> tuple[float, float, dict]:
    """(forward, backward) seconds of one MoE layer's dispatch + combine, and
    the traffic behind them."""
    if s.ep <= 1:
        return 0.0, 0.0, {}
    nodes = s.ep // s.ep_per_node
    d = destinations(m.num_routed_experts, m.moe_topk, m.n_group, m.topk_group, str(m.group_score), s.ep,
                     s.ep_per_node, m.max_nodes_per_token, s.hops)
    sent = s.tokens / s.tp  # each TP rank dispatches its own slice

    def one_way(payload: float) -> float:
        ib = d.ib_sends * sent * payload / hw.ib_bw
        nvlink = d.nvlink_sends * sent * payload / hw.nvlink_bw
        return max(ib, nvlink) + LINK_LATENCY_S * s.hops

    dtype = torch.bfloat16 if s.dtype_bytes == 2 else torch.float32
    bf16 = payload_row_bytes(m.hidden_size, 0, dtype, fp8=False)  # the combine: the expert output
    dispatch = payload_row_bytes(m.hidden_size, m.moe_topk, dtype, fp8=s.fp8)  # the token with its gates
    # The backward: the output gradient toward the experts (FP8 under train.fp8, as the
    # dispatch) and the expert input's gradient back (high precision).
    gradient = payload_row_bytes(m.hidden_size, 0, dtype, fp8=s.fp8)
    limit = m.max_nodes_per_token if 0 < m.max_nodes_per_token < nodes else nodes
    traffic = {"nodes_spanned": nodes, "node_limit": limit, "remote_nodes_per_token": d.remote_nodes,
               "remote_gpus_per_token": d.remote_gpus, "ib_sends_per_token": d.ib_sends,
               "nvlink_sends_per_token": d.nvlink_sends, "dispatch_bytes_per_send": dispatch,
               "combine_bytes_per_send": bf16, "backward_bytes_per_send": gradient}
    return one_way(dispatch) + one_way(bf16), one_way(gradient) + one_way(bf16), traffic


def op_costs(m, s: Setting, stage: dict, hw: Hardware) -> dict:
    """``F``, ``B``, ``W`` (seconds) of one stage and micro-batch, with the
    exchange parts ``F_comm``/``B_comm`` and a breakdown for explanations."""
    w = stage_work(m, s, stage)
    linear_rate = hw.fp8_flops if s.fp8 else hw.bf16_flops
    # The routed experts' GEMMs follow train.fp8 as the linears do.
    gemm = (w.linear_flops + w.routed_flops) / linear_rate + w.bf16_flops / hw.bf16_flops
    attention = w.attention_flops / hw.attention_flops
    memory = w.memory_bytes / hw.memory_bw
    tp = 0.0
    if s.tp > 1:
        tp = 2 * 2 * (s.tp - 1) / s.tp * w.tp_bytes / hw.link_bw(s.tp > hw.gpus_per_node)
    slowdown = hw.sms / (hw.sms - s.exchange_sms) if w.moe_layers and s.exchange_sms else 1.0
    fwd_x, bwd_x, traffic = exchange_seconds(m, s, hw)
    f_comm, b_comm = w.moe_layers * fwd_x, w.moe_layers * bwd_x
    forward = slowdown * (gemm + attention + memory + tp)
    dgrad = slowdown * (gemm + ATTENTION_BACKWARD * attention + 2 * memory + tp)
    wgrad = slowdown * gemm
    recompute = slowdown * w.recompute_flops / linear_rate
    if s.recompute == "full":
        recompute, b_comm = forward, b_comm + f_comm
    return {
        "F": forward + f_comm, "B": dgrad + recompute + b_comm + wgrad, "W": wgrad,
        "F_comm": f_comm, "B_comm": b_comm,
        "breakdown": {"gemm_s": gemm, "attention_s": attention, "memory_s": memory, "tp_s": tp,
                      "exchange_forward_s": f_comm, "exchange_backward_s": b_comm, "recompute_s": recompute,
                      "sm_slowdown": slowdown, "moe_layers": w.moe_layers,
                      "flops": {"linear": w.linear_flops, "routed": w.routed_flops, "bf16": w.bf16_flops,
                                "attention": w.attention_flops}},
        "traffic": traffic,
    }

"""Model facts for planning, by arithmetic on the config (no tensors).

Parameter counts follow the architecture built in ``mtrain.model`` (DeepSeek-V3):
untied embedding and output head, MLA attention, dense SwiGLU for the first
``first_k_dense`` layers and MoE (router, shared SwiGLU, routed SwiGLU experts)
after, RMSNorm weights, no biases. The expert score bias is a buffer, not a
parameter, and is not counted.

The counts reproduce the published figures: DeepSeek-V3 671.0B total (MTP
apart) and 36.6B activated (published 37B), DeepSeek-V2-Lite 15.7B / 2.45B
(published 15.7B / 2.4B), DeepSeek-V2 235.7B / 20.9B (published 236B / 21B).
"Activated" follows the convention that fits all three: the parameters that
multiply a token's activations, so the output head is in and the embedding
table (a lookup) is out. Counting the embedding too would give V2-Lite 2.66B.
"""
from __future__ import annotations

from mtrain.config.schema import resolve_dtype
from mtrain.config.validate import planned_world_size

def swiglu_params(hidden: int, width: int) -> int:
    """Gate, up and down projections of one SwiGLU MLP."""
    return 3 * hidden * width


def attention_params(m) -> int:
    """MLA projections and latent norms of one layer."""
    qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank > 0:
        q = m.hidden_size * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * m.num_heads * qk_head
    else:
        q = m.hidden_size * m.num_heads * qk_head
    kv_a = m.hidden_size * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
    kv_b = m.kv_lora_rank * m.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
    o = m.num_heads * m.v_head_dim * m.hidden_size
    return q + kv_a + kv_b + o


def attention_replicated_params(m) -> int:
    """The part of MLA that is not split over tensor parallelism: the latent
    down-projections (q_a, kv_a) and the latent norms, which have no head dimension."""
    q_a = m.hidden_size * m.q_lora_rank + m.q_lora_rank if m.q_lora_rank > 0 else 0
    return q_a + m.hidden_size * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank


def has_moe(m) -> bool:
    return m.first_k_dense < m.num_layers


def block_params(m, dense: bool) -> dict[str, int]:
    """One transformer block (two RMSNorms, MLA, dense or MoE MLP), by piece."""
    pieces = {"attention": attention_params(m), "norms": 2 * m.hidden_size,
              "dense_mlp": 0, "moe_routed": 0, "moe_shared": 0, "router": 0}
    if dense:
        pieces["dense_mlp"] = swiglu_params(m.hidden_size, m.ffn_hidden_size)
    else:
        pieces["moe_routed"] = m.num_routed_experts * swiglu_params(m.hidden_size, m.moe_ffn_hidden_size)
        # The shared experts run as one SwiGLU of num_shared times the width.
        pieces["moe_shared"] = swiglu_params(m.hidden_size, m.num_shared_experts * m.moe_ffn_hidden_size)
        pieces["router"] = m.num_routed_experts * m.hidden_size
    return pieces


def _activated(pieces: dict[str, int], m) -> int:
    """Parameters one token multiplies: only ``moe_topk`` of the routed experts."""
    routed = pieces.get("moe_routed", 0)
    active_routed = routed * m.moe_topk // m.num_routed_experts if routed else 0
    return sum(pieces.values()) - routed + active_routed


def mtp_module_pieces(m) -> dict[str, int]:
    """One MTP module without the embedding and head it shares with the main model:
    RMSNorms of the hidden state and of the embedding, the 2h -> h projection, one
    block (MoE when the model has MoE layers, as DeepSeek-V3's) and its final norm."""
    pieces = block_params(m, dense=not has_moe(m))
    pieces["norms"] += 3 * m.hidden_size
    pieces["projection"] = 2 * m.hidden_size * m.hidden_size
    return pieces


def layer_pieces(m, layer: int) -> dict[str, int]:
    return block_params(m, dense=layer < m.first_k_dense)


def param_counts(m) -> dict:
    """Parameter counts of a model config.

    ``total``: the main model (MTP apart), embedding and head included.
    ``activated``: per token, embedding lookup excluded (see the module doc).
    ``mtp``/``mtp_activated``: all ``mtp_depth`` MTP modules, shared embedding and
    head not counted again. ``breakdown``: the main model by piece (sums to total).
    """
    breakdown = {"embedding": m.vocab_size * m.hidden_size, "attention": 0, "dense_mlp": 0,
                 "moe_routed": 0, "moe_shared": 0, "router": 0, "norms": m.hidden_size,  # final norm
                 "head": m.hidden_size * m.vocab_size}
    activated = breakdown["head"] + breakdown["norms"]
    for layer in range(m.num_layers):
        pieces = layer_pieces(m, layer)
        for key, n in pieces.items():
            breakdown[key] += n
        activated += _activated(pieces, m)
    mtp = mtp_module_pieces(m)
    return {
        "total": sum(breakdown.values()),
        "activated": activated,
        "mtp": m.mtp_depth * sum(mtp.values()),
        "mtp_activated": m.mtp_depth * _activated(mtp, m),
        "breakdown": breakdown,
    }


def attention_core_flops(m, seq_len: int) -> float:
    """Forward FLOPs per token of the score and value products of one layer.

    A query scores each visible key with a qk_head-long dot product (2·qk_head
    FLOPs per head) and weights each visible value (2·v_head FLOPs per head).
    With the causal mask a query sees on average seq_len/2 keys (counted as
    half, the usual convention), so per token:
    2 · heads · (qk_head + v_head) · seq_len / 2.
    """
    qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    return 2 * m.num_heads * (qk_head + m.v_head_dim) * seq_len / 2


def flops_per_token(m, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at ``seq_len``.

    forward = 2 · (activated matrix-multiply parameters) + attention core FLOPs;
    backward = 2 × forward (input and weight gradients), so training = 3 × forward.
    Matrix-multiply parameters are the activated ones without the norm weights
    (elementwise); the embedding lookup does no multiply, the head does. With
    ``mtp_depth`` > 0 each MTP module adds its projection, block and attention
    core, and one more pass through the shared head. Recomputation is not
    counted (model FLOPs, as MFU uses them).
    """
    norms = 2 * m.num_layers * m.hidden_size + m.hidden_size
    matmul = param_counts(m)["activated"] - norms
    attention = m.num_layers * attention_core_flops(m, seq_len)
    if m.mtp_depth > 0:
        module = _activated(mtp_module_pieces(m), m) - 5 * m.hidden_size  # its 5 norms
        matmul += m.mtp_depth * (module + m.hidden_size * m.vocab_size)
        attention += m.mtp_depth * attention_core_flops(m, seq_len)
    return 3.0 * (2.0 * matmul + attention)




# Bytes per parameter. bf16: bf16 weights for compute, fp32 gradient accumulation,
# AdamW with an fp32 master copy and two fp32 moments. fp32: the weights are
# the master copy, so AdamW adds only the two moments.
BYTES_PER_PARAM = {
    "fp32": {"weights": 4, "grads": 4, "optimizer": 8},
    "bf16": {"weights": 2, "grads": 4, "optimizer": 12},
}
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2}
LOGITS_BYTES = 4  # the loss is taken on fp32 logits


def _split_share(m, pieces: dict[str, int], tp: int) -> float:
    """Non-expert parameters of ``pieces`` on one tensor-parallel rank: norms,
    router and MLA latent down-projections are replicated, the rest is split."""
    replicated = pieces["norms"] + pieces["router"]
    if pieces["attention"]:
        replicated += attention_replicated_params(m)
    split = sum(pieces.values()) - pieces["moe_routed"] - replicated
    return replicated + split / tp


def _rank_modules(m, rank_stages: list[dict]) -> list[dict[str, int]]:
    """The blocks and MTP modules of ``rank_stages``, by piece."""
    modules = [layer_pieces(m, layer) for stage in rank_stages for layer in stage["layers"]]
    return modules + [mtp_module_pieces(m) for stage in rank_stages if stage["mtp"]] * m.mtp_depth


def rank_params(m, rank_stages: list[dict], tp: int, ep: int, expert_tp: int) -> tuple[float, float]:
    """(non-expert, routed-expert) parameters held by one rank holding ``rank_stages``
    (entries with ``layers``, ``embedding``, ``head``, ``mtp``). The vocabulary is
    split over tp; routed experts over ep (whole experts) and expert_tp (width)."""
    dense = expert = 0.0
    for pieces in _rank_modules(m, rank_stages):
        dense += _split_share(m, pieces, tp)
        expert += pieces["moe_routed"] / (ep * expert_tp)
    for stage in rank_stages:
        dense += stage["embedding"] * m.vocab_size * m.hidden_size / tp
        dense += stage["head"] * (m.vocab_size * m.hidden_size / tp + m.hidden_size)
    return dense, expert


def rank_fp8_params(m, rank_stages: list[dict], tp: int, ep: int, expert_tp: int) -> float:
    """Parameters of one rank whose GEMMs run FP8 under ``train.fp8=blockwise``:
    every linear of the blocks and MTP modules, routed experts included; not
    the embedding, head, router or norms (MLA's latent norm weights, a few
    thousand per layer, are counted in)."""
    total = 0.0
    for pieces in _rank_modules(m, rank_stages):
        total += _split_share(m, dict(pieces, norms=0, router=0), tp) + pieces["moe_routed"] / (ep * expert_tp)
    return total


FP8_ROW_BYTES_PER_ELEMENT = 1 + 4 / 128  # E4M3 data and one fp32 scale per 1x128 tile
FP8_WEIGHT_BYTES_PER_PARAM = 1 + 4 / 128 ** 2  # E4M3 data and one fp32 scale per 128x128 block


def layer_activation_elements(m, dense: bool, tp: int, expert_tp: int, fp8_ratio: float | None = None,
                              recompute: str | None = None) -> float:
    """Activation elements, in units of the activation dtype, one block keeps
    per token for its backward. ``fp8_ratio``: under ``train.fp8=blockwise``,
    the bytes of an FP8 element (with its scale) over the activation dtype's.
    ``recompute``: ``model.recompute`` to count for (default ``m``'s own).

    What the block's backward keeps: the two RMSNorms' inputs; each linear's
    input (one copy for linears reading the same tensor; under FP8 its
    tokenwise FP8 tiles instead: ``mtrain.model.fp8_linear``); the Q and KV
    latents before their norms; the rope key; the attention core's q, k and
    v and its output, v and the output at the query/key head dim (the values
    are padded for the fused kernel, ``mtrain.model.attention``; no score
    matrix); per SwiGLU width its
    gate, silu(gate), up and product (under FP8 only gate and up, in FP8: the
    rest is recomputed). MoE blocks: the router's input (high precision) and
    scores, the shared experts' input under FP8 (their own tiles), the
    ``moe_topk`` routed copies of the token and the experts' outputs (for the
    combine). Selective recompute drops the normed latents and the core's q,
    k and v (rebuilt from the latents before the core's backward). Not
    counted: reciprocal RMS values, softmax statistics and index tensors.
    Replicated over tp unless split by heads or width; routed widths are
    split over expert_tp.
    """
    h = m.hidden_size
    fp8 = fp8_ratio is not None
    kept_input = fp8_ratio if fp8 else 1.0  # bytes of a linear's kept input, per element
    swiglu = 2 * fp8_ratio if fp8 else 4.0  # kept per SwiGLU width
    qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim

    core = max(qk_head, m.v_head_dim)  # the values (and so the output) padded to the query/key dim
    selective = str(m.recompute if recompute is None else recompute) == "selective"

    replicated = 2 * h  # the RMSNorms' inputs
    replicated += kept_input * h  # the attention norm's output: q_a and kv_a's input
    replicated += m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim  # kv_a's and q_a's outputs
    if not selective:
        replicated += kept_input * (m.q_lora_rank + m.kv_lora_rank)  # q_b's and kv_b's inputs
    split = m.num_heads * (core if selective else 2 * qk_head + 2 * core)  # the core's output (and q, k, v)
    split += kept_input * m.num_heads * m.v_head_dim  # o_proj's input
    experts = 0.0
    if dense:
        replicated += kept_input * h  # the MLP's input
        split += swiglu * m.ffn_hidden_size
    else:
        replicated += h + m.num_routed_experts  # the router's input and scores
        if m.num_shared_experts and fp8:
            replicated += kept_input * h  # the shared experts' own tiles of that input
        split += swiglu * m.num_shared_experts * m.moe_ffn_hidden_size
        replicated += (kept_input + 1) * m.moe_topk * h  # routed copies in, experts' outputs back
        experts = m.moe_topk * swiglu * m.moe_ffn_hidden_size / expert_tp
    return replicated + split / tp + experts


def _chunk_activation_elements(m, stage: dict, tp: int, expert_tp: int, fp8_ratio: float | None = None) -> float:
    """Per-token activation elements of one stage chunk. Full recompute keeps
    only each block's input (the recompute working set is added once by
    :func:`memory_estimate`)."""
    blocks = [layer_activation_elements(m, layer < m.first_k_dense, tp, expert_tp, fp8_ratio)
              for layer in stage["layers"]]
    if stage["mtp"]:
        # Each module also keeps its two normed inputs, their concatenation and the projection.
        mtp_block = layer_activation_elements(m, not has_moe(m), tp, expert_tp, fp8_ratio)
        blocks += [mtp_block + 6 * m.hidden_size] * m.mtp_depth
    if m.recompute == "full":
        return len(blocks) * m.hidden_size
    return sum(blocks)


def memory_estimate(cfg, rank_stages: list[dict], peak_inflight_microbatches: int,
                    world_size: int | None = None) -> dict:
    """Estimated bytes on one rank holding ``rank_stages`` (its stage chunks,
    entries with ``layers``, ``embedding``, ``head``, ``mtp``). An estimate: it
    ignores communication buffers, allocator fragmentation and framework overhead.

    weights = params · bytes(dtype); grads = params · 4 (fp32 accumulation);
    optimizer = AdamW states (see BYTES_PER_PARAM), divided over dp for
    non-expert parameters and over expert_dp for routed experts when
    ``train.zero1`` is set (ZeRO-1 shards only optimizer states).
    activations = peak_inflight_microbatches · (largest chunk's elements per
    token) · micro_batch_size · seq_len · bytes(dtype), plus, once, the fp32
    softmax of the head and of every MTP depth and one logits gradient on a
    rank with the head (vocab split over tp) and one block's working set under
    full recompute.

    Under ``train.fp8=blockwise`` the linears' kept inputs and the SwiGLUs'
    inputs are FP8 with their scales (:func:`layer_activation_elements`), and
    fp8_weights is the one FP8 copy of every FP8 weight that a step's
    micro-batches share (``mtrain.model.fp8_linear``).

    ``train.dtype=auto`` is taken as the dtype it resolves to on the planned
    cluster: bf16 (GPUs), unless ``parallel.backend=gloo`` (fp32).
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = resolve_dtype(t.dtype, p.backend)
    world = planned_world_size(cfg) if world_size is None else world_size
    dp = world // (p.tp * p.pp)
    expert_dp = world // (p.pp * p.ep * p.expert_tp)
    per_param = BYTES_PER_PARAM[dtype]
    dense, expert = rank_params(m, rank_stages, p.tp, p.ep, p.expert_tp)
    shards = (dp, expert_dp) if t.zero1 else (1, 1)
    optimizer = per_param["optimizer"] * (dense / shards[0] + expert / shards[1])

    tokens = t.micro_batch_size * cfg.data.seq_len
    fp8 = str(t.fp8) == "blockwise"
    ratio = FP8_ROW_BYTES_PER_ELEMENT / ACTIVATION_BYTES[dtype] if fp8 else None
    chunk = max(_chunk_activation_elements(m, s, p.tp, p.expert_tp, ratio) for s in rank_stages)
    activations = peak_inflight_microbatches * chunk * tokens * ACTIVATION_BYTES[dtype]
    if any(s["head"] for s in rank_stages):
        # The softmax of the main head and of every MTP depth is kept for the
        # backward, plus one gradient of the logits at a time.
        activations += (2 + m.mtp_depth) * tokens * (m.vocab_size / p.tp) * LOGITS_BYTES
    if m.recompute == "full":
        kinds = [dense for dense, present in ((True, m.first_k_dense > 0), (False, has_moe(m))) if present]
        largest = max(layer_activation_elements(m, dense, p.tp, p.expert_tp, ratio) for dense in kinds)
        activations += largest * tokens * ACTIVATION_BYTES[dtype]
    result = {
        "params": dense + expert,
        "weights": per_param["weights"] * (dense + expert),
        "fp8_weights": FP8_WEIGHT_BYTES_PER_PARAM * rank_fp8_params(m, rank_stages, p.tp, p.ep, p.expert_tp)
        if fp8 else 0,
        "grads": per_param["grads"] * (dense + expert),
        "optimizer": optimizer,
        "activations": activations,
    }
    result = {k: int(round(v)) for k, v in result.items()}
    result["total"] = sum(v for k, v in result.items() if k != "params")
    return result

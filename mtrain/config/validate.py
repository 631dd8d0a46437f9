"""All cross-field validation, in one place.

``config_errors`` returns *every* problem at once, each naming the fields, the
values and the fix; ``check_config`` raises them together. Nothing here creates
a process group or a tensor.
"""
from __future__ import annotations

from mtrain.model.moe.gemm_backends import KINDS as GEMM_KINDS
from mtrain.parallel.layout import layout_errors, parse_order, LayoutError
from mtrain.pipeline.schedule_rules import num_model_stages, schedule_errors
from mtrain.train.lr import lr_schedule_errors

RECOMPUTE = ("none", "selective", "full")
DISPATCHERS = ("auto", "local", "alltoall", "deepep")
SCORE_FUNCS = ("sigmoid", "softmax")
DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "wsd", "constant")
BACKENDS = ("auto", "gloo", "nccl")


class ConfigError(ValueError):
    """One or more config problems; ``errors`` holds them all."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid config:\n" + "\n".join(f"  - {e}" for e in self.errors))


def planned_world_size(cfg) -> int:
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node


def _choice(errors, field, value, allowed):
    if value not in allowed:
        errors.append(f"{field}={value!r} is not one of {', '.join(allowed)}")


def _model_errors(m, tp: int, ep: int) -> list[str]:
    errors = []
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if getattr(m, name) < 1:
            errors.append(f"model.{name}={getattr(m, name)} must be at least 1")
    if m.qk_rope_head_dim % 2:
        errors.append(f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even (rotary pairs)")
    if m.num_heads % tp:
        errors.append(
            f"model.num_heads={m.num_heads} is not divisible by parallel.tp={tp}: "
            f"attention heads are split over tp; pick tp dividing {m.num_heads}"
        )
    if not 0 <= m.first_k_dense <= m.num_layers:
        errors.append(f"model.first_k_dense={m.first_k_dense} must be within 0..model.num_layers={m.num_layers}")
    has_moe = m.first_k_dense < m.num_layers
    if has_moe:
        if m.num_routed_experts < 1 or m.moe_ffn_hidden_size < 1:
            errors.append("model.num_routed_experts and model.moe_ffn_hidden_size must be at least 1 when MoE layers exist")
        elif m.num_routed_experts % ep:
            errors.append(
                f"model.num_routed_experts={m.num_routed_experts} is not divisible by parallel.ep={ep}: "
                f"each EP rank holds the same number of experts; pick ep dividing {m.num_routed_experts}"
            )
        if m.n_group < 1 or (m.num_routed_experts >= 1 and m.num_routed_experts % m.n_group):
            errors.append(
                f"model.n_group={m.n_group} must divide model.num_routed_experts={m.num_routed_experts}"
            )
        elif not 1 <= m.topk_group <= m.n_group:
            errors.append(f"model.topk_group={m.topk_group} must be within 1..model.n_group={m.n_group}")
        elif m.moe_topk < 1 or m.moe_topk > m.topk_group * (m.num_routed_experts // m.n_group):
            errors.append(
                f"model.moe_topk={m.moe_topk} must be within 1..topk_group*experts_per_group = "
                f"{m.topk_group * (m.num_routed_experts // m.n_group)} (the experts in the kept groups)"
            )
        _choice(errors, "model.score_func", m.score_func, SCORE_FUNCS)
    if m.mtp_depth < 0:
        errors.append(f"model.mtp_depth={m.mtp_depth} must be >= 0")
    if m.rope_scaling_factor < 1.0:
        errors.append(f"model.rope_scaling_factor={m.rope_scaling_factor} must be >= 1 (1 disables YaRN)")
    _choice(errors, "model.recompute", m.recompute, RECOMPUTE)
    _choice(errors, "model.grouped_gemm", m.grouped_gemm, GEMM_KINDS)
    return errors


def _stage_errors(m, p) -> list[str]:
    stages = num_model_stages(p.schedule, p.pp)
    if p.pipeline_layout is not None:
        layout = list(p.pipeline_layout)
        if len(layout) != stages:
            return [
                f"parallel.pipeline_layout has {len(layout)} entries but parallel.schedule={p.schedule} "
                f"with parallel.pp={p.pp} cuts the model into {stages} stages: give one layer count per stage"
            ]
        if any(n < 0 for n in layout) or sum(layout) != m.num_layers:
            return [
                f"parallel.pipeline_layout={layout} must be non-negative layer counts summing to "
                f"model.num_layers={m.num_layers} (they sum to {sum(layout)})"
            ]
        return []
    if m.num_layers < stages:
        return [
            f"model.num_layers={m.num_layers} cannot be split over {stages} pipeline stages "
            f"(parallel.schedule={p.schedule}, parallel.pp={p.pp}): lower pp or add layers"
        ]
    return []


def config_errors(cfg, world_size: int | None = None) -> list[str]:
    """Every problem of ``cfg`` (a Config dataclass or DictConfig).

    ``world_size`` defaults to ``cluster.nodes * cluster.gpus_per_node``; a
    launched job passes the real one.
    """
    p, m, t = cfg.parallel, cfg.model, cfg.train
    world = planned_world_size(cfg) if world_size is None else world_size
    errors = []
    try:
        parse_order(p.order)
    except LayoutError as e:
        errors.append(str(e))
    errors += layout_errors(world, p.tp, p.ep, p.expert_tp, p.pp)
    if p.dp is not None and p.tp * p.pp >= 1 and p.dp * p.tp * p.pp != world:
        errors.append(
            f"parallel.dp={p.dp} with parallel.tp={p.tp} and parallel.pp={p.pp} needs "
            f"{p.dp * p.tp * p.pp} ranks, but the world size is {world}: set parallel.dp=null to derive it"
        )
    errors += schedule_errors(p.schedule, p.pp, p.num_microbatches)
    _choice(errors, "parallel.dispatcher", p.dispatcher, DISPATCHERS)
    _choice(errors, "parallel.backend", p.backend, BACKENDS)
    if p.dispatcher == "local" and p.ep > 1:
        errors.append(f"parallel.dispatcher=local works only with parallel.ep=1 (got ep={p.ep}): use alltoall or auto")
    errors += _model_errors(m, max(p.tp, 1), max(p.ep, 1))
    if p.schedule in ("1f1b", "zb1p", "dualpipe", "dualpipev") and p.pp >= 1:
        errors += _stage_errors(m, p)
    _choice(errors, "train.dtype", t.dtype, DTYPES)
    _choice(errors, "train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if t.steps < 1 or t.micro_batch_size < 1:
        errors.append(f"train.steps={t.steps} and train.micro_batch_size={t.micro_batch_size} must be at least 1")
    if cfg.data.seq_len < 2:
        errors.append(f"data.seq_len={cfg.data.seq_len} must be at least 2")
    elif cfg.data.seq_len > m.max_seq_len:
        errors.append(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    errors += lr_schedule_errors(t)
    _choice(errors, "logging.wandb_mode", cfg.logging.wandb_mode, ("offline", "online", "disabled"))
    if cfg.checkpoint.interval < 1 or cfg.checkpoint.keep_last < 1:
        errors.append("checkpoint.interval and checkpoint.keep_last must be at least 1")
    return errors


def check_config(cfg, world_size: int | None = None) -> None:
    errors = config_errors(cfg, world_size)
    if errors:
        raise ConfigError(errors)

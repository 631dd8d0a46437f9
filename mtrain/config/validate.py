"""The config rules that need nothing but the config itself.

Choices (``parallel.schedule`` and the like) are enums in the schema and are
checked when the config is composed. The rules that need the parallel,
pipeline and train packages (rank layout, schedules, learning rate) are added
by :mod:`mtrain.train.preflight`, which assembles ``config_errors`` and
``check_config``. ``mtrain.config`` is the lowest layer: nothing here imports
another mtrain package.
Every message names the fields, the values and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing

from mtrain.config.schema import Choice, Config

# Choices whose own rules (the schedule rules, the LR schedule) report an unknown name.
_CHOICES_CHECKED_ELSEWHERE = ("parallel.schedule", "train.lr_schedule")


class ProblemList(ValueError):
    """Several problems reported at once under ``heading``; ``errors`` holds them all."""

    heading = "invalid input"

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__(f"{self.heading}:\n" + "\n".join(f"  - {e}" for e in self.errors))


class ConfigError(ProblemList):
    """One or more config problems."""

    heading = "invalid config"


def choice_fields(schema: type = Config, prefix: str = "") -> dict[str, type[Choice]]:
    """Dotted key -> enum of every choice field of the schema."""
    fields = {}
    for name, hint in typing.get_type_hints(schema).items():
        if isinstance(hint, type) and issubclass(hint, Choice):
            fields[prefix + name] = hint
        elif dataclasses.is_dataclass(hint):
            fields.update(choice_fields(hint, f"{prefix}{name}."))
    return fields


def unknown_key_error(key: str, schema: type = Config) -> str | None:
    """Why ``key`` (dotted) names no field of the schema, with the nearest
    field as the fix; None when it does (or leads into a free-form field)."""
    node, path = schema, []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None  # inside a list, dict or plain value: the schema says no more
        hints = typing.get_type_hints(node)
        if part not in hints:
            where = ".".join(path) or "the config"
            near = difflib.get_close_matches(part, hints, n=1)
            hint = f"did you mean {'.'.join(path + near)}?" if near else \
                f"its fields are {', '.join(sorted(hints))}"
            return (f"{key}: {where} has no field {part!r} ({hint}); a key outside the schema "
                    f"(mtrain/config/schema.py) would be ignored")
        node, path = hints[part], path + [part]
    return None


def choice_error(key: str, value, choices: type[Choice]) -> str:
    return f"{key}={value!r} is not a valid choice; choose one of {', '.join(choices.values())}"


def _choice_errors(cfg) -> list[str]:
    """A composed config holds enums already; a Config built in code may hold any string."""
    errors = []
    for key, choices in choice_fields().items():
        if key in _CHOICES_CHECKED_ELSEWHERE:
            continue
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and str(value) not in choices.values():
            errors.append(choice_error(key, str(value), choices))
    return errors


def planned_world_size(cfg) -> int:
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node


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
        elif m.n_group > 1 and m.num_routed_experts // m.n_group < 2 and m.group_score == "top2_sum":
            errors.append(f"model.n_group={m.n_group} leaves one expert per group; a group's score is the sum of "
                          f"its two best experts' scores (model.group_score=top2_sum), so make n_group at most "
                          f"num_routed_experts / 2 (or 1 for no groups)")
        elif not 1 <= m.topk_group <= m.n_group:
            errors.append(f"model.topk_group={m.topk_group} must be within 1..model.n_group={m.n_group}")
        elif m.moe_topk < 1 or m.moe_topk > m.topk_group * (m.num_routed_experts // m.n_group):
            errors.append(
                f"model.moe_topk={m.moe_topk} must be within 1..topk_group*experts_per_group = "
                f"{m.topk_group * (m.num_routed_experts // m.n_group)} (the experts in the kept groups)"
            )
    if m.max_nodes_per_token < 0:
        errors.append(f"model.max_nodes_per_token={m.max_nodes_per_token} must be >= 0 (0: no node limit)")
    elif m.max_nodes_per_token and m.moe_topk % m.max_nodes_per_token:
        errors.append(f"model.max_nodes_per_token={m.max_nodes_per_token} must divide model.moe_topk={m.moe_topk}: "
                      f"a node is scored by its top moe_topk / max_nodes_per_token experts")
    if m.mtp_depth < 0:
        errors.append(f"model.mtp_depth={m.mtp_depth} must be >= 0")
    if m.rope_scaling_factor < 1.0:
        errors.append(f"model.rope_scaling_factor={m.rope_scaling_factor} must be >= 1 (1 disables YaRN)")
    return errors


FP8_TILE = 128  # mtrain.model.fp8.BLOCK: 1x128 activation tiles, 128x128 weight blocks


def fp8_width_errors(m, tp: int, expert_tp: int = 1) -> list[str]:
    """train.fp8=blockwise: every width an FP8 GEMM reduces over (a wired
    linear's input features, on one TP rank) must be a multiple of 128. With
    tp > 1 so must a column-parallel shard's rows (q_b or q_proj, kv_b; the
    gate/up rows equal down's input), so TP ranks quantize the single-rank
    model's blocks and tiles.

    The wired linears (docs/fp8.md): q_a, kv_a and q_proj (hidden_size), q_b
    (q_lora_rank), kv_b (kv_lora_rank), o_proj (num_heads x v_head_dim / tp),
    the dense MLP's down (ffn_hidden_size / tp) and gate/up (hidden_size), the
    shared experts' (num_shared_experts x moe_ffn_hidden_size / tp, and
    hidden_size), MTP's proj (2 x hidden_size: covered by hidden_size), the
    routed experts' gate/up (hidden_size) and down (moe_ffn_hidden_size /
    expert_tp, one expert-TP rank's slice of an expert). Output widths may be
    ragged (an edge block, as in DeepSeek-V3's 576-row kv_a_proj_with_mqa);
    token counts are padded.
    """
    heads = m.num_heads
    or_tp = " or parallel.tp" if tp > 1 else ""
    widths = [  # (what, width on one rank, which field to change)
        ("model.hidden_size", m.hidden_size, "model.hidden_size"),
        ("model.kv_lora_rank", m.kv_lora_rank, "model.kv_lora_rank"),
        (f"model.num_heads x model.v_head_dim / parallel.tp (the output projection's input: "
         f"{heads} x {m.v_head_dim} / {tp})", heads * m.v_head_dim // tp,
         "model.v_head_dim, model.num_heads or parallel.tp" if tp > 1 else "model.v_head_dim or model.num_heads"),
    ]
    if tp > 1:
        # A column-parallel shard's rows: aligned, the shard's weight blocks and its
        # Dgrad's dy tiles are the single-rank model's (docs/fp8.md, "Tensor parallelism").
        qk, kv = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_nope_head_dim + m.v_head_dim
        widths += [
            (f"model.num_heads x (model.qk_nope_head_dim + model.qk_rope_head_dim) / parallel.tp (the query "
             f"up-projection's rows on one rank: {heads} x {qk} / {tp})", heads * qk // tp,
             "model.qk_nope_head_dim, model.qk_rope_head_dim, model.num_heads or parallel.tp"),
            (f"model.num_heads x (model.qk_nope_head_dim + model.v_head_dim) / parallel.tp (kv_b's rows on one "
             f"rank: {heads} x {kv} / {tp})", heads * kv // tp,
             "model.qk_nope_head_dim, model.v_head_dim, model.num_heads or parallel.tp"),
        ]
    if m.q_lora_rank:
        widths.append(("model.q_lora_rank", m.q_lora_rank, "model.q_lora_rank"))
    if m.first_k_dense:
        widths.append((f"model.ffn_hidden_size / parallel.tp ({m.ffn_hidden_size} / {tp})",
                       m.ffn_hidden_size // tp, f"model.ffn_hidden_size{or_tp}"))
    if m.first_k_dense < m.num_layers + m.mtp_depth:  # some MoE layer (MTP's layers come after the main ones)
        if m.num_shared_experts:
            widths.append((f"model.num_shared_experts x model.moe_ffn_hidden_size / parallel.tp "
                           f"({m.num_shared_experts} x {m.moe_ffn_hidden_size} / {tp})",
                           m.num_shared_experts * m.moe_ffn_hidden_size // tp,
                           f"model.moe_ffn_hidden_size{or_tp}"))
        widths.append((f"model.moe_ffn_hidden_size / parallel.expert_tp (a routed expert's down projection "
                       f"input: {m.moe_ffn_hidden_size} / {expert_tp})", m.moe_ffn_hidden_size // expert_tp,
                       "model.moe_ffn_hidden_size or parallel.expert_tp"))
    return [f"train.fp8=blockwise: {what}={w} is not a multiple of {FP8_TILE} (FP8 GEMMs reduce in "
            f"{FP8_TILE}-wide tiles): set {fix} so it is, or train.fp8=none"
            for what, w, fix in widths if w % FP8_TILE]


def field_errors(cfg, world_size: int | None = None) -> list[str]:
    """The problems of ``cfg`` found from its own fields (see the module doc).

    ``world_size`` defaults to ``cluster.nodes * cluster.gpus_per_node``.
    """
    p, m, t = cfg.parallel, cfg.model, cfg.train
    world = planned_world_size(cfg) if world_size is None else world_size
    errors = _choice_errors(cfg)
    if p.dp is not None and p.tp * p.pp >= 1 and p.dp * p.tp * p.pp != world:
        errors.append(
            f"parallel.dp={p.dp} with parallel.tp={p.tp} and parallel.pp={p.pp} needs "
            f"{p.dp * p.tp * p.pp} ranks, but the world size is {world}: set parallel.dp=null to derive it"
        )
    if p.dispatcher == "local" and p.ep > 1:
        errors.append(f"parallel.dispatcher=local works only with parallel.ep=1 (got ep={p.ep}): use alltoall or auto")
    if p.dispatch_hops not in (None, 1, 2):
        errors.append(f"parallel.dispatch_hops={p.dispatch_hops} must be 1, 2 or null (2 when the EP group spans "
                      f"several nodes)")
    elif p.dispatch_hops == 2 and p.dispatcher not in ("auto", "alltoall"):
        errors.append(f"parallel.dispatch_hops=2 is the alltoall dispatcher's two-level exchange, not "
                      f"{p.dispatcher}'s: use parallel.dispatcher=alltoall or dispatch_hops=null")
    errors += _model_errors(m, max(p.tp, 1), max(p.ep, 1))
    if t.fp8 == "blockwise":
        errors += fp8_width_errors(m, max(p.tp, 1), max(p.expert_tp, 1))
    if t.steps < 1 or t.micro_batch_size < 1:
        errors.append(f"train.steps={t.steps} and train.micro_batch_size={t.micro_batch_size} must be at least 1")
    if cfg.data.seq_len < 2:
        errors.append(f"data.seq_len={cfg.data.seq_len} must be at least 2")
    elif cfg.data.seq_len > m.max_seq_len:
        errors.append(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if cfg.checkpoint.interval < 1 or cfg.checkpoint.keep_last < 1:
        errors.append("checkpoint.interval and checkpoint.keep_last must be at least 1")
    errors += _eval_errors(cfg.eval)
    return errors


def _eval_errors(e) -> list[str]:
    """The ``eval`` group's own rules (the split's format is checked by mtrain.data.split)."""
    errors = []
    if e.interval is not None and e.interval < 0:
        errors.append(f"eval.interval={e.interval} must be >= 0 (0 or null: no evaluation during training)")
    elif e.interval and e.split is None and e.path is None:
        errors.append(f"eval.interval={e.interval} evaluates held-out data, but none is held out: set "
                      f"eval.split=98/1/1 (documents of data.path) or eval.path=<indexed dataset prefix>, "
                      f"or eval.interval=0")
    if e.steps < 1:
        errors.append(f"eval.steps={e.steps} must be at least 1 (global batches per evaluation)")
    if e.prompt is not None and not str(e.prompt):
        errors.append("eval.prompt is empty: give the text to continue, or null for no samples")
    if e.sample_tokens < 0 or (e.prompt is not None and e.sample_tokens < 1):
        errors.append(f"eval.sample_tokens={e.sample_tokens} must be at least 1 with an eval.prompt "
                      f"(tokens generated greedily after it)")
    return errors

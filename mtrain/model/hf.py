"""The Hugging Face view of a model config: ``transformers``' DeepSeek config
for an mtrain ``model`` config, and back from a checkpoint's ``config.json``
(:func:`model_fields`). The tensors are mapped in :mod:`mtrain.model.hf_weights`.

``transformers`` is imported only when asked for (it is a reference and an
interchange format here, not a dependency of training); the config.json
mapping needs only the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from mtrain.model.rope import yarn_mscale


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("this needs the transformers package: pip install transformers") from e
    return transformers


def hf_config(cfg, **overrides):
    """The ``transformers`` config (``DeepseekV3Config``, or ``DeepseekV2Config``
    for a softmax router) with the shapes and routing of ``cfg`` (a ``model``
    config), as :func:`hf_config_dict` writes it. YaRN settings map to HF's
    ``rope_scaling``."""
    transformers = require_transformers()
    fields = hf_config_dict(cfg)
    fields.pop("architectures")
    fields.update(overrides)
    model_type = fields.pop("model_type")
    cls = transformers.DeepseekV2Config if model_type == "deepseek_v2" else transformers.DeepseekV3Config
    return cls(**fields)


# -- config.json <-> model config ----------------------------------------------------

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# Keys of an imported config.json that are not carried to the exported one: FP8 settings (the
# export is dequantized), remote code, and what the fields written here state or derive.
_NOT_CARRIED = ("quantization_config", "auto_map", "rope_parameters", "head_dim", "qk_head_dim", "dtype",
                "torch_dtype")
_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
# config.json keys every supported checkpoint states (save_pretrained and the Hub's files do).
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
             "moe_intermediate_size", "num_experts_per_tok")
# transformers' defaults for the keys a config.json may leave out, per model type.
_DEFAULTS = {
    "deepseek_v3": dict(q_lora_rank=1536, first_k_dense_replace=3, n_shared_experts=1, n_group=8, topk_group=4,
                        norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                        max_position_embeddings=4096, scoring_func="sigmoid", topk_method="noaux_tc"),
    "deepseek_v2": dict(q_lora_rank=1536, first_k_dense_replace=0, n_shared_experts=2, n_group=None,
                        topk_group=None, norm_topk_prob=False, routed_scaling_factor=1.0,
                        num_nextn_predict_layers=0, max_position_embeddings=2048, scoring_func="softmax",
                        topk_method="greedy"),
}


class HFConfigError(ValueError):
    """A Hugging Face config mtrain cannot represent; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{source}:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class HFLayout:
    """What a Hugging Face checkpoint's tensors look like beyond the model config.

    ``model_type``: ``deepseek_v3`` (sigmoid router with a score-correction
    bias) or ``deepseek_v2`` (softmax router, no bias). ``rope_interleave``
    (V3's config flag): the rope dims of the query and ``k_pe`` are stored in
    interleaved pairs, as mtrain rotates them; false: in half-split order.
    ``fp8_block``: the block of FP8 weights' ``weight_scale_inv``."""

    model_type: str = "deepseek_v3"
    rope_interleave: bool = True
    fp8_block: tuple[int, int] = (128, 128)


def hf_layout(config: Mapping[str, Any]) -> HFLayout:
    """The layout a config.json describes."""
    model_type = config.get("model_type", "deepseek_v3")
    interleave = bool(config.get("rope_interleave", True)) if model_type == "deepseek_v3" else True
    block = (config.get("quantization_config") or {}).get("weight_block_size", (128, 128))
    return HFLayout(model_type, interleave, tuple(int(b) for b in block))


def _rope_parameters(config: Mapping[str, Any]) -> dict:
    """HF's rope settings in either spelling: transformers 5's ``rope_parameters``
    or the Hub's ``rope_scaling`` + ``rope_theta``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _yarn_fields(config: Mapping[str, Any], rope: dict, problems: list[str]) -> dict:
    """mtrain's YaRN fields for HF's: the same frequencies, cos/sin amplitude
    and softmax scale as transformers computes them."""
    factor = rope.get("factor") or config.get("max_position_embeddings", 0) / rope["original_max_position_embeddings"]
    all_dim, mscale = rope.get("mscale_all_dim") or 0.0, rope.get("mscale") or 0.0
    # transformers: amplitude mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are
    # set, else mscale(factor, 1); softmax scale times mscale(factor, mscale_all_dim)^2 when that is set.
    if all_dim and not mscale:
        problems.append(f"rope mscale_all_dim={all_dim} without mscale: transformers then scales the rotary "
                        f"tables by mscale(factor) and the softmax by mscale(factor, mscale_all_dim)^2, which "
                        f"mtrain's yarn_mscale/yarn_mscale_all_dim cannot express")
    if not all_dim:  # the amplitude alone: mscale(factor, 1), or attention_factor when stated
        af = rope.get("attention_factor")
        mscale = 1.0 if af is None or factor <= 1 else (af - 1.0) / (0.1 * math.log(factor))
    fields = dict(rope_scaling_factor=float(factor),
                  rope_original_max_seq_len=int(rope.get("original_max_position_embeddings") or 0),
                  yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
                  yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                  yarn_mscale=float(mscale), yarn_mscale_all_dim=float(all_dim))
    if rope.get("attention_factor") is not None:
        expected = yarn_mscale(factor, fields["yarn_mscale"]) / yarn_mscale(factor, fields["yarn_mscale_all_dim"])
        if not math.isclose(rope["attention_factor"], expected, rel_tol=1e-6):
            problems.append(f"rope attention_factor={rope['attention_factor']} differs from the YaRN mscale ratio "
                            f"{expected}; mtrain derives it from mscale and mscale_all_dim")
    if rope.get("truncate") is False:
        problems.append("rope truncate=false: mtrain rounds the YaRN correction range to whole pairs, as DeepSeek")
    return fields


def model_fields(config: Mapping[str, Any], name: str = "hf") -> dict:
    """mtrain ``model`` config fields (``ModelConfig``) for a Hugging Face
    DeepSeek-V2/V3 ``config.json`` dict. Sizes, routing, norms and positions
    come from the file; training settings (the balancing loss and speed, the
    MTP loss weight) keep mtrain's defaults, except ``bias_update_speed: 0``
    for V2, which has no expert bias.
    Raises :class:`HFConfigError` listing every setting mtrain cannot represent."""
    problems = []
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConfigError("config.json", [f"model_type={model_type!r}: mtrain converts "
                                            f"{' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints"])
    c = {**_DEFAULTS[model_type], **{k: v for k, v in config.items() if v is not None or k == "q_lora_rank"}}
    missing = [k for k in _REQUIRED if c.get(k) is None]
    if missing:
        raise HFConfigError("config.json", [f"{k} is not set" for k in missing])
    for key, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                        ("tie_word_embeddings", False), ("moe_layer_freq", 1)):
        if key in c and c[key] != wanted:
            problems.append(f"{key}={c[key]!r}: mtrain's DeepSeek model has {key}={wanted!r}")
    if c.get("num_key_value_heads") not in (None, c["num_attention_heads"]):
        problems.append(f"num_key_value_heads={c['num_key_value_heads']} differs from num_attention_heads="
                        f"{c['num_attention_heads']}: MLA has one key/value head per query head")
    scoring = "sigmoid" if model_type == "deepseek_v3" else "softmax"
    if c.get("scoring_func", scoring) != scoring:
        problems.append(f"scoring_func={c['scoring_func']!r}: {model_type} routers score with {scoring}")
    fields = dict(name=name, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                  num_layers=c["num_hidden_layers"], first_k_dense=c["first_k_dense_replace"],
                  ffn_hidden_size=c["intermediate_size"], num_heads=c["num_attention_heads"],
                  q_lora_rank=c["q_lora_rank"] or 0, kv_lora_rank=c["kv_lora_rank"],
                  qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
                  v_head_dim=c["v_head_dim"], num_routed_experts=c["n_routed_experts"],
                  num_shared_experts=c["n_shared_experts"] or 0, moe_ffn_hidden_size=c["moe_intermediate_size"],
                  moe_topk=c["num_experts_per_tok"], score_func=scoring, norm_topk_prob=bool(c["norm_topk_prob"]),
                  routed_scaling_factor=float(c["routed_scaling_factor"]),
                  rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), max_seq_len=c["max_position_embeddings"],
                  init_std=float(c.get("initializer_range", 0.02)))
    if model_type == "deepseek_v3":
        method = c.get("topk_method", "noaux_tc")
        if method != "noaux_tc":
            problems.append(f"topk_method={method!r}: DeepSeek-V3 routes with noaux_tc")
        fields.update(n_group=c["n_group"] or 1, topk_group=c["topk_group"] or 1, group_score="top2_sum",
                      mtp_depth=int(c["num_nextn_predict_layers"] or 0))
    else:
        method = c["topk_method"]
        if method == "greedy":
            fields.update(n_group=1, topk_group=1)
        elif method == "group_limited_greedy":
            fields.update(n_group=c["n_group"], topk_group=c["topk_group"], group_score="max")
        else:
            problems.append(f"topk_method={method!r}: DeepSeek-V2 routes with greedy or group_limited_greedy")
        fields.update(mtp_depth=0, bias_update_speed=0.0)
    rope = _rope_parameters(c)
    fields["rope_theta"] = float(rope["rope_theta"])
    if rope["rope_type"] == "yarn":
        fields.update(_yarn_fields(c, rope, problems))
    elif rope["rope_type"] != "default":
        problems.append(f"rope_type={rope['rope_type']!r}: mtrain supports plain rotary positions and YaRN")
    if problems:
        raise HFConfigError("config.json", problems)
    return fields


def hf_model_type(cfg) -> str:
    """The Hugging Face model type that expresses ``cfg``'s router: V3 for
    sigmoid scores with groups scored by their two best experts, V2 for
    softmax scores with groups scored by their best (or no groups)."""
    grouped = cfg.n_group > 1
    if cfg.score_func == "sigmoid" and (cfg.group_score == "top2_sum" or not grouped):
        return "deepseek_v3"
    if cfg.score_func == "softmax" and (cfg.group_score == "max" or not grouped):
        return "deepseek_v2"
    raise HFConfigError("model config", [
        f"model.score_func={cfg.score_func} with model.group_score={cfg.group_score} and n_group={cfg.n_group}: "
        f"transformers' DeepSeek-V3 scores with sigmoid and groups by their two best experts, DeepSeek-V2 with "
        f"softmax and groups by their best; neither expresses this router"])


def hf_config_dict(cfg, layout: Optional[HFLayout] = None, base: Optional[Mapping[str, Any]] = None) -> dict:
    """A Hugging Face ``config.json`` for ``cfg`` (a ``model`` config), the
    inverse of :func:`model_fields`. ``base`` (the config.json a checkpoint
    was imported from) keeps its other keys (token ids, ...); its FP8
    ``quantization_config`` and remote-code ``auto_map`` are dropped."""
    model_type = hf_model_type(cfg)
    layout = layout or HFLayout(model_type)
    out = {k: v for k, v in (base or {}).items() if k not in _NOT_CARRIED}
    out.update(
        architectures=[_ARCHITECTURES[model_type]], model_type=model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        first_k_dense_replace=cfg.first_k_dense, intermediate_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        n_routed_experts=cfg.num_routed_experts, n_shared_experts=cfg.num_shared_experts,
        moe_intermediate_size=cfg.moe_ffn_hidden_size, num_experts_per_tok=cfg.moe_topk,
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, scoring_func=str(cfg.score_func), moe_layer_freq=1,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
        tie_word_embeddings=False, rope_theta=cfg.rope_theta, rope_scaling=None, attention_bias=False,
        attention_dropout=0.0, hidden_act="silu", aux_loss_alpha=cfg.aux_loss_alpha,
    )
    if model_type == "deepseek_v3":
        out.update(topk_method="noaux_tc", num_nextn_predict_layers=cfg.mtp_depth,
                   rope_interleave=layout.rope_interleave)
    else:
        out.update(topk_method="group_limited_greedy" if cfg.n_group > 1 else "greedy")
        for key in ("num_nextn_predict_layers", "rope_interleave"):
            out.pop(key, None)
    if cfg.rope_scaling_factor != 1.0:
        out["rope_scaling"] = {
            "type": "yarn", "rope_type": "yarn", "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
            "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow,
            "mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim,
        }
        if not cfg.yarn_mscale_all_dim:  # transformers would ignore mscale: state the amplitude itself
            out["rope_scaling"]["attention_factor"] = yarn_mscale(cfg.rope_scaling_factor, cfg.yarn_mscale)
    return out

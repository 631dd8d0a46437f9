"""The Hugging Face ``transformers`` view of a model config.

``transformers`` is imported only when asked for (it is a reference and an
interchange format here, not a dependency of training).
"""
from __future__ import annotations


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("this needs the transformers package: pip install transformers") from e
    return transformers


def hf_config(cfg, **overrides):
    """``transformers.DeepseekV3Config`` with the shapes and routing of ``cfg``
    (a ``model`` config). YaRN settings map to HF's ``rope_scaling``."""
    transformers = require_transformers()
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        first_k_dense_replace=cfg.first_k_dense, intermediate_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        n_routed_experts=cfg.num_routed_experts, n_shared_experts=cfg.num_shared_experts,
        moe_intermediate_size=cfg.moe_ffn_hidden_size, num_experts_per_tok=cfg.moe_topk,
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std, tie_word_embeddings=False,
        rope_theta=cfg.rope_theta, attention_bias=False, attention_dropout=0.0,
    )
    if cfg.rope_scaling_factor != 1.0:
        fields["rope_scaling"] = {
            "type": "yarn", "rope_type": "yarn", "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
            "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow,
            "mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim,
        }
    fields.update(overrides)
    return transformers.DeepseekV3Config(**fields)

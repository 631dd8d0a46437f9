"""Small random Hugging Face DeepSeek-V2/V3 models and checkpoints for the conversion tests.

Every parameter is random (norms around 1, the V3 expert bias nonzero), so a
mapping that drops, swaps or mis-orders any tensor changes the logits. An
MTP module can be added to a saved checkpoint in DeepSeek-V3's layout (HF's
model classes hold none).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
             q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1,
             num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256, norm_topk_prob=True,
             routed_scaling_factor=2.5, num_mtp_layers=0)


def hf_config(model_type: str = "deepseek_v3", **overrides):
    import transformers

    fields = {**SMALL, **overrides}
    if model_type == "deepseek_v2":
        fields.pop("num_mtp_layers")
        fields.setdefault("topk_method", "greedy")
        return transformers.DeepseekV2Config(**fields)
    return transformers.DeepseekV3Config(**fields)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def random_model(model_type: str = "deepseek_v3", seed: int = 0, **overrides):
    """A random ``DeepseekV3ForCausalLM`` (or V2), fp32, eval mode, sdpa attention."""
    import transformers

    config = hf_config(model_type, **overrides)
    config._attn_implementation = "sdpa"
    cls = transformers.DeepseekV2ForCausalLM if model_type == "deepseek_v2" else transformers.DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    randomize(model, seed)
    return model.eval()


def mtp_layer(model, seed: int = 7):
    """A random MTP module for ``model`` (DeepSeek-V3), as transformers' ``MtpLayer``."""
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    layer = MtpLayer(model.config, DeepseekV3DecoderLayer, DeepseekV3RMSNorm, model.config.num_hidden_layers)
    randomize(layer, seed)
    return layer.eval()


def per_expert(prefix: str, state: dict) -> dict:
    """A decoder layer's state dict under ``prefix`` with the fused experts split
    per expert, as DeepSeek's checkpoints and ``save_pretrained`` name them."""
    out = {}
    for key, t in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up[e]
        elif key.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[prefix + key] = t
    return out


def mtp_tensors(model, layer) -> dict:
    """The MTP module ``layer`` in DeepSeek-V3's checkpoint layout (layer index num_hidden_layers)."""
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    out = per_expert(prefix, {k: v for k, v in layer.mtp_block.state_dict().items()})
    out.update({prefix + "enorm.weight": layer.enorm.weight, prefix + "hnorm.weight": layer.hnorm.weight,
                prefix + "eh_proj.weight": layer.eh_proj.weight,
                prefix + "shared_head.norm.weight": layer.post_norm.weight,
                prefix + "embed_tokens.weight": model.model.embed_tokens.weight,
                prefix + "shared_head.head.weight": model.lm_head.weight})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def save(model, path, max_shard_size: str = "60KB", extra: dict | None = None) -> Path:
    """``save_pretrained`` into ``path`` (several shards); ``extra`` tensors
    (an MTP module) go into one more shard, named in the index, and count as
    ``num_nextn_predict_layers`` in config.json."""
    from safetensors.torch import save_file

    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if extra:
        save_file(extra, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
        index_file = path / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
        index_file.write_text(json.dumps(index))
        config = json.loads((path / "config.json").read_text())
        config["num_nextn_predict_layers"] = 1
        (path / "config.json").write_text(json.dumps(config))
    return path


def read_tensors(path) -> dict:
    """Every tensor of a safetensors model directory, by name."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def load_mtrain(checkpoint_root):
    """The single-rank mtrain model of a converted checkpoint, weights loaded, eval mode."""
    from mtrain.model.model import ModelChunk
    from mtrain.train.checkpoint import Checkpointer
    from mtrain.train.checkpoint_files import resolve_checkpoint
    from mtrain.train.hf_export import find_model_config
    from mtrain.train.state import ModelState

    step = resolve_checkpoint(checkpoint_root)
    cfg = find_model_config(step)
    model = ModelChunk(cfg, list(range(cfg.num_layers)))
    Checkpointer(step.parent).load(step, {"model": ModelState(dict(model.named_parameters()), [model])})
    return model.eval(), cfg

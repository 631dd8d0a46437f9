"""Hugging Face DeepSeek-V2/V3 tensors <-> mtrain's full tensors (pure: names,
shapes and layouts; no files).

Each mtrain tensor (a global parameter name of the single-rank model, or a
router's ``expert_bias``) is linked to the Hugging Face tensors that store it;
import (:func:`import_plan`, :func:`from_hf`) and export (:func:`to_hf`) both
follow these links. With ``L = num_layers``, MTP depth ``k`` (from 1) is HF's
layer ``L + k - 1``:

==================================  ==============================================  =====================
mtrain                              Hugging Face                                    how
==================================  ==============================================  =====================
``embed.weight``                    ``model.embed_tokens.weight``                   same (MTP copies too)
``final_norm.weight``               ``model.norm.weight``                           same
``head.weight``                     ``lm_head.weight``                              same (MTP copies too)
``layers.{i}.attn_norm``            ``model.layers.{i}.input_layernorm``            same
``layers.{i}.mlp_norm``             ``model.layers.{i}.post_attention_layernorm``   same
``layers.{i}.attn.q_a/q_a_norm``    ``...self_attn.q_a_proj/q_a_layernorm``         same
``layers.{i}.attn.q_b`` / q_proj    ``...self_attn.q_b_proj`` / ``q_proj``          rope rows (below)
``layers.{i}.attn.kv_a``            ``...self_attn.kv_a_proj_with_mqa``             rope rows (below)
``layers.{i}.attn.kv_a_norm/kv_b``  ``...self_attn.kv_a_layernorm/kv_b_proj``       same
``layers.{i}.attn.o_proj``          ``...self_attn.o_proj``                         same
``layers.{i}.mlp.{gate,up,down}``   ``...mlp.{gate,up,down}_proj`` (dense)          same
``layers.{i}.mlp.router.weight``    ``...mlp.gate.weight``                          same
``...mlp.router.expert_bias``       ``...mlp.gate.e_score_correction_bias`` (V3)    same; V2 has none: 0
``...mlp.shared.{gate,up,down}``    ``...mlp.shared_experts.{gate,up,down}_proj``   same
``...mlp.experts.{gate,up,down}``   ``...mlp.experts.{e}.{gate,up,down}_proj``      expert e of the stack
``mtp.{k-1}.{embed,hidden}_norm``   ``model.layers.{L+k-1}.{enorm,hnorm}``          same
``mtp.{k-1}.proj``                  ``model.layers.{L+k-1}.eh_proj``                input halves swapped
``mtp.{k-1}.final_norm``            ``model.layers.{L+k-1}.shared_head.norm``       same
``mtp.{k-1}.layer.*``               ``model.layers.{L+k-1}.*`` as a decoder layer   as above
==================================  ==============================================  =====================

(``.weight`` left out after the first rows.) Notes:

- **Rope rows.** mtrain rotates interleaved pairs ``(2j, 2j+1)`` of each head's
  rope dims, as DeepSeek's reference and HF with ``rope_interleave: true``
  (V2 always) do. With ``rope_interleave: false`` HF stores them half-split
  (pair j is dims ``j`` and ``j + d/2``): the rope rows of every query head and
  of ``k_pe`` (the last rows of ``kv_a``) are permuted on import and back on
  export.
- **MTP.** DeepSeek's ``eh_proj`` takes ``[enorm(embedding); hnorm(hidden)]``,
  mtrain's ``proj`` ``[hidden_norm(hidden); embed_norm(embedding)]``: the two
  column halves swap. The MTP layer's ``embed_tokens`` and ``shared_head.head``
  are copies of the shared embedding and head (mtrain keeps one of each).
- **Fused experts.** ``transformers`` 5 holds a layer's experts as
  ``mlp.experts.gate_up_proj [E, 2F, H]`` and ``mlp.experts.down_proj
  [E, H, F]``; a checkpoint storing them so is imported too (export writes
  per-expert names, as the Hub and ``save_pretrained`` do).
- **FP8.** A ``float8_e4m3fn`` tensor ``W`` comes with ``W_scale_inv``, one fp32
  factor per block (128 x 128 in DeepSeek-V3): :func:`dequantize_fp8`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from mtrain.model.hf import HFLayout
from mtrain.model.model import ModelChunk

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn,)

# Decoder layer tensors: mtrain suffix -> (HF suffix, kind).
_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight", "same"),
    "mlp_norm.weight": ("post_attention_layernorm.weight", "same"),
    "attn.q_a.weight": ("self_attn.q_a_proj.weight", "same"),
    "attn.q_a_norm.weight": ("self_attn.q_a_layernorm.weight", "same"),
    "attn.q_b.weight": ("self_attn.q_b_proj.weight", "rope_q"),
    "attn.q_proj.weight": ("self_attn.q_proj.weight", "rope_q"),
    "attn.kv_a.weight": ("self_attn.kv_a_proj_with_mqa.weight", "rope_kv"),
    "attn.kv_a_norm.weight": ("self_attn.kv_a_layernorm.weight", "same"),
    "attn.kv_b.weight": ("self_attn.kv_b_proj.weight", "same"),
    "attn.o_proj.weight": ("self_attn.o_proj.weight", "same"),
    "mlp.gate.weight": ("mlp.gate_proj.weight", "same"),
    "mlp.up.weight": ("mlp.up_proj.weight", "same"),
    "mlp.down.weight": ("mlp.down_proj.weight", "same"),
    "mlp.router.weight": ("mlp.gate.weight", "same"),
    "mlp.router.expert_bias": ("mlp.gate.e_score_correction_bias", "same"),
    "mlp.shared.gate.weight": ("mlp.shared_experts.gate_proj.weight", "same"),
    "mlp.shared.up.weight": ("mlp.shared_experts.up_proj.weight", "same"),
    "mlp.shared.down.weight": ("mlp.shared_experts.down_proj.weight", "same"),
}
_EXPERTS = {"mlp.experts.gate": "gate_proj", "mlp.experts.up": "up_proj", "mlp.experts.down": "down_proj"}
_MTP = {"embed_norm.weight": ("enorm.weight", "same"), "hidden_norm.weight": ("hnorm.weight", "same"),
        "proj.weight": ("eh_proj.weight", "swap_halves"), "final_norm.weight": ("shared_head.norm.weight", "same")}
_TOP = {"embed.weight": ("model.embed_tokens.weight", "embed_tokens.weight"),
        "final_norm.weight": ("model.norm.weight", None),
        "head.weight": ("lm_head.weight", "shared_head.head.weight")}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Link:
    """One Hugging Face tensor holding (part of) an mtrain tensor.

    ``kind``: ``same``; ``rope_q``/``rope_kv`` (rope rows permuted when the
    layout is half-split); ``expert`` (slice ``expert`` of the stacked
    experts); ``swap_halves`` (MTP ``eh_proj``); ``copy`` (an MTP copy of the
    embedding or head: written on export, compared on import);
    ``fused_gate``/``fused_up`` (halves of ``gate_up_proj``, import only)."""

    hf: str
    kind: str = "same"
    expert: Optional[int] = None


@dataclass(frozen=True)
class Piece:
    """Part of an mtrain tensor made from one HF tensor: the whole tensor, or
    expert ``expert`` of the stack (its leading dim dropped)."""

    name: str
    tensor: torch.Tensor
    expert: Optional[int] = None


def mtrain_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Full shape of every tensor a checkpoint of the single-rank model holds
    (parameters and routers' ``expert_bias``), by global name; built on the
    meta device, so free for any size."""
    with torch.device("meta"):
        model = ModelChunk(cfg, list(range(cfg.num_layers)))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers() if name.endswith("expert_bias")})
    return shapes


def _layer_prefix(name: str, num_layers: int) -> Optional[tuple[str, str]]:
    """(HF prefix, mtrain suffix) of a decoder-layer tensor name, else None."""
    m = re.match(r"^layers\.(\d+)\.(.+)$", name) or re.match(r"^mtp\.(\d+)\.layer\.(.+)$", name)
    if m is None:
        return None
    index = int(m.group(1)) + (num_layers if name.startswith("mtp.") else 0)
    return f"model.layers.{index}.", m.group(2)


def links(name: str, shape: tuple[int, ...], cfg, layout: HFLayout) -> list[Link]:
    """The HF tensors of mtrain tensor ``name`` (of full ``shape``), export order."""
    L = cfg.num_layers
    if name in _TOP:
        main, copy = _TOP[name]
        return [Link(main)] + ([Link(f"model.layers.{L + k}.{copy}", "copy") for k in range(cfg.mtp_depth)]
                               if copy else [])
    m = re.match(r"^mtp\.(\d+)\.([a-z_]+\.weight)$", name)
    if m and m.group(2) in _MTP:
        suffix, kind = _MTP[m.group(2)]
        return [Link(f"model.layers.{L + int(m.group(1))}.{suffix}", kind)]
    split = _layer_prefix(name, L)
    if split is not None:
        prefix, rest = split
        if rest in _EXPERTS:
            return [Link(f"{prefix}mlp.experts.{e}.{_EXPERTS[rest]}.weight", "expert", e) for e in range(shape[0])]
        if rest == "mlp.router.expert_bias" and layout.model_type == "deepseek_v2":
            return []  # V2 routers have no bias: import leaves it 0, export drops it
        if rest in _LAYER:
            suffix, kind = _LAYER[rest]
            if kind.startswith("rope") and layout.rope_interleave:
                kind = "same"
            return [Link(prefix + suffix, kind)]
    raise KeyError(f"{name}: no Hugging Face counterpart known")


def fused_links(name: str, shape: tuple[int, ...], cfg) -> list[Link]:
    """The ``transformers`` 5 fused form of a stacked-experts tensor (import only)."""
    prefix, rest = _layer_prefix(name, cfg.num_layers)
    if rest == "mlp.experts.down":
        return [Link(f"{prefix}mlp.experts.down_proj")]
    return [Link(f"{prefix}mlp.experts.gate_up_proj", "fused_gate" if rest.endswith("gate") else "fused_up")]


def _hf_shape(link: Link, shape: tuple[int, ...]) -> tuple[int, ...]:
    if link.kind == "expert":
        return shape[1:]
    if link.kind in ("fused_gate", "fused_up"):
        return (shape[0], 2 * shape[1], shape[2])
    return shape


# -- layouts -----------------------------------------------------------------------

def _rope_order(rope_dim: int, to_interleaved: bool) -> torch.Tensor:
    """Row order turning half-split rope dims into interleaved pairs
    (``[0, d/2, 1, d/2 + 1, ...]``: pair j is dims j and j + d/2), or back."""
    order = torch.arange(rope_dim).view(2, rope_dim // 2).t().flatten()
    return order if to_interleaved else order.argsort()


def _permute_rope(t: torch.Tensor, kind: str, cfg, to_interleaved: bool) -> torch.Tensor:
    rope = cfg.qk_rope_head_dim
    order = _rope_order(rope, to_interleaved).to(t.device)
    if kind == "rope_kv":  # rows [kv_lora_rank latent | rope_dim k_pe]
        latent, k_pe = t.split([t.shape[0] - rope, rope])
        return torch.cat([latent, k_pe.index_select(0, order)])
    heads = t.view(cfg.num_heads, cfg.qk_nope_head_dim + rope, -1)  # rows per head [nope | rope]
    nope, pe = heads.split([cfg.qk_nope_head_dim, rope], dim=1)
    return torch.cat([nope, pe.index_select(1, order)], dim=1).reshape(t.shape)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)


def to_hf(name: str, tensor: torch.Tensor, cfg, layout: HFLayout) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors (name, tensor) storing mtrain's full tensor ``name``."""
    out = []
    for link in links(name, tuple(tensor.shape), cfg, layout):
        if link.kind == "expert":
            t = tensor[link.expert]
        elif link.kind.startswith("rope"):
            t = _permute_rope(tensor, link.kind, cfg, to_interleaved=False)
        elif link.kind == "swap_halves":
            t = _swap_halves(tensor)
        elif link.kind == "copy":
            t = tensor.clone()  # its own storage: safetensors refuses tensors that share memory
        else:
            t = tensor
        out.append((link.hf, t.contiguous()))
    return out


def from_hf(link: Link, name: str, tensor: torch.Tensor, cfg) -> Optional[Piece]:
    """The piece of mtrain tensor ``name`` that HF tensor ``link.hf`` holds
    (None for a ``copy``, which holds nothing of its own)."""
    if link.kind == "copy":
        return None
    if link.kind == "expert":
        return Piece(name, tensor, link.expert)
    if link.kind.startswith("rope"):
        tensor = _permute_rope(tensor, link.kind, cfg, to_interleaved=True)
    elif link.kind == "swap_halves":
        tensor = _swap_halves(tensor)
    elif link.kind in ("fused_gate", "fused_up"):
        tensor = tensor.chunk(2, dim=1)[0 if link.kind == "fused_gate" else 1]
    return Piece(name, tensor.contiguous())


# -- planning an import ----------------------------------------------------------------

@dataclass
class ImportPlan:
    """HF name -> the (mtrain name, link) pairs it feeds; ``copies``: HF name
    -> the HF name it must equal; ``absent``: mtrain tensors no HF tensor holds
    (V2's expert bias), which start at zero."""

    targets: dict[str, list[tuple[str, Link]]]
    copies: dict[str, str]
    absent: list[str]


def import_plan(cfg, layout: HFLayout, available: Mapping[str, tuple[int, ...]],
                shapes: Optional[Mapping[str, tuple[int, ...]]] = None) -> tuple[ImportPlan, list[str]]:
    """How the HF tensors ``available`` (name -> shape, FP8 scales left out)
    make mtrain's model ``cfg``, and every problem: a missing, extra or
    mis-shaped tensor. A layer whose experts are stored fused is planned
    from the fused tensors."""
    shapes = shapes or mtrain_shapes(cfg)
    targets, copies, absent, expected = {}, {}, [], {}
    for name, shape in shapes.items():
        found = links(name, shape, cfg, layout)
        if found and found[0].kind == "expert" and fused_links(name, shape, cfg)[0].hf in available:
            found = fused_links(name, shape, cfg)
        if not found:
            absent.append(name)
        main = found[0].hf if found else None
        for link in found:
            expected[link.hf] = _hf_shape(link, shape)
            if link.kind == "copy":
                copies[link.hf] = main
            targets.setdefault(link.hf, []).append((name, link))
    problems = [f"missing: {n} {list(s)}" for n, s in expected.items() if n not in available]
    problems += [f"unexpected: {n} {list(available[n])}" for n in available
                 if n not in expected and not IGNORED.match(n)]
    problems += [f"wrong shape: {n} is {list(available[n])}, expected {list(s)}" for n, s in expected.items()
                 if n in available and tuple(available[n]) != tuple(s)]
    return ImportPlan({n: t for n, t in targets.items() if n in available}, copies, absent), problems


def mtp_layer_names(names, cfg) -> list[str]:
    """The names among ``names`` that belong to HF's MTP layers (index >= num_layers)."""
    return [n for n in names if (m := re.match(r"^model\.layers\.(\d+)\.", n)) and int(m.group(1)) >= cfg.num_layers]


# -- FP8 ------------------------------------------------------------------------

def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` of a 2-D FP8 weight: one factor per block, edge blocks ragged."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``weight`` (FP8, ``[rows, cols]``) times its block's factor of
    ``scale_inv`` (``[ceil(rows / b0), ceil(cols / b1)]``), in fp32, cast to ``dtype``."""
    rows, cols = weight.shape
    if tuple(scale_inv.shape) != scale_shape((rows, cols), block):
        raise ValueError(f"scale_inv of shape {list(scale_inv.shape)} does not fit a [{rows}, {cols}] weight in "
                         f"{block[0]}x{block[1]} blocks (expected {list(scale_shape((rows, cols), block))})")
    factors = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * factors).to(dtype)

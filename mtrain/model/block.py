"""One decoder layer: MLA attention, then a dense MLP or an MoE layer.

The layer is a program of steps over a :class:`LayerCarry` (attention | the
MoE layer's routed program | add the MLP output), so the pipeline runtime can
overlap the MoE exchanges of one micro-batch with another micro-batch's
compute; ``forward()`` runs the same program plainly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from mtrain.model.attention import MLAttention
from mtrain.model.mlp import DenseMLP
from mtrain.model.groups import ModelGroups
from mtrain.model.moe.layer import MoECarry, MoELayer
from mtrain.model.norm import RMSNorm
from mtrain.runtime.context import StepContext, maybe_recompute
from mtrain.runtime.program import Compute, run_plain


@dataclass
class LayerCarry(MoECarry):
    """An MoE carry plus the rotary tables of this sequence length."""

    rope: Optional[tuple] = None  # (cos, sin)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, groups: ModelGroups):
        super().__init__()
        self.name = f"L{layer_idx}"
        self.full_recompute = cfg.recompute == "full"
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile)
        self.attn = MLAttention(cfg, groups.tp, fp8=groups.fp8)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile)
        if layer_idx < cfg.first_k_dense:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.ffn_hidden_size, groups.tp, cfg.init_std, cfg.compile,
                                groups.fp8)
        else:
            self.mlp = MoELayer(cfg, groups)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                step: Optional[StepContext] = None) -> torch.Tensor:
        return run_plain(self.program(), LayerCarry(hidden=x, rope=(cos, sin)), step or StepContext()).hidden

    def program(self) -> list:
        """This layer as steps over a carry whose ``hidden`` it transforms."""
        if not self.is_moe:
            return [Compute(self._dense_step, f"{self.name}.dense")]
        return ([Compute(self._attention_step, f"{self.name}.attn")] + self.mlp.program(self.name)
                + [Compute(self._moe_output_step, f"{self.name}.finish")])

    # The steps.
    def _attention(self, x, cos, sin):
        return x + self.attn(self.attn_norm(x), cos[: x.shape[1]], sin[: x.shape[1]])

    def _dense(self, x, cos, sin):
        h = self._attention(x, cos, sin)
        return h + self.mlp(self.mlp_norm(h))

    def _dense_step(self, c: LayerCarry, step: StepContext) -> LayerCarry:
        return c.replace(hidden=maybe_recompute(self.full_recompute, self._dense, c.hidden, *c.rope))

    def _attention_step(self, c: LayerCarry, step: StepContext) -> LayerCarry:
        h = maybe_recompute(self.full_recompute, self._attention, c.hidden, *c.rope)
        return c.replace(hidden=h, normed=self.mlp_norm(h))

    def _moe_output_step(self, c: LayerCarry, step: StepContext) -> LayerCarry:
        y = self.mlp.output(c)
        return c.replace(hidden=c.hidden + y, normed=None, rows=None, plan=None)

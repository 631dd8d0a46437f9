"""One decoder layer (MLA attention, then a dense MLP or an MoE layer), written
as a program of steps so that the pipeline runtime can overlap the MoE
exchanges of one micro-batch with another micro-batch's compute."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mtrain.model.attention import MLAttention
from mtrain.model.mlp import DenseMLP
from mtrain.model.moe.layer import MoELayer
from mtrain.model.norm import RMSNorm
from mtrain.pipeline.program import Comm, Compute


@dataclass
class ModelGroups:
    """The process groups the model talks over (None: a single rank)."""

    tp: Optional[object] = None
    ep: Optional[object] = None
    expert_tp: Optional[object] = None
    dispatcher: str = "auto"
    deepep_num_sms: int = 20


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, groups: ModelGroups):
        super().__init__()
        self.name = f"L{layer_idx}"
        self.full_recompute = cfg.recompute == "full"
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLAttention(cfg, groups.tp)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if layer_idx < cfg.first_k_dense:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.ffn_hidden_size, groups.tp, cfg.init_std)
        else:
            self.mlp = MoELayer(cfg, groups.tp, groups.ep, groups.dispatcher, groups.deepep_num_sms, groups.expert_tp)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def _attention(self, x, cos, sin):
        return x + self.attn(self.attn_norm(x), cos, sin)

    def _dense(self, x, cos, sin):
        h = self._attention(x, cos, sin)
        return h + self.mlp(self.mlp_norm(h))

    def steps(self, key: str = "x") -> list:
        """This layer as program steps acting on ``state[key]``.

        Per-layer intermediates live in ``ctx`` under this layer's name (a
        chunk runs several layers per micro-batch) and in ``state`` under
        names prefixed with it.
        """
        n = self.name

        def rope(ctx, x):
            cos, sin = ctx["rope"]
            return cos[: x.shape[1]], sin[: x.shape[1]]

        if not self.is_moe:
            def dense(state, ctx):
                return {**state, key: _maybe_checkpoint(self.full_recompute, self._dense, state[key], *rope(ctx, state[key]))}

            return [Compute(dense, f"{n}.dense")]

        def attention_and_route(state, ctx):
            h = _maybe_checkpoint(self.full_recompute, self._attention, state[key], *rope(ctx, state[key]))
            x_norm = self.mlp_norm(h)
            rows, gates, plan = self.mlp.route(x_norm)
            ctx[f"{n}.plan"], ctx[f"{n}.dispatch"], ctx[f"{n}.combine"] = plan, plan.dispatch_op, plan.combine_op
            return {**state, key: h, f"{n}.xn": x_norm, f"{n}.rows": rows, f"{n}.gates": gates}

        def experts(state, ctx):
            rows = _maybe_checkpoint(self.full_recompute, self.mlp.compute_experts, state[f"{n}.rows"], ctx[f"{n}.plan"])
            return {**state, f"{n}.rows": rows}

        def finish(state, ctx):
            rest = {k: v for k, v in state.items() if not k.startswith(f"{n}.")}
            y = self.mlp.finish(state[f"{n}.rows"], state[f"{n}.gates"], state[f"{n}.xn"], ctx.pop(f"{n}.plan"))
            return {**rest, key: state[key] + y}

        return [
            Compute(attention_and_route, f"{n}.attn"),
            Comm(f"{n}.rows", f"{n}.dispatch", f"{n}.dispatch"),
            Compute(experts, f"{n}.experts"),
            Comm(f"{n}.rows", f"{n}.combine", f"{n}.combine"),
            Compute(finish, f"{n}.finish"),
        ]

"""The MoE layer: shared experts plus routed experts behind a dispatcher.

Its routed path is a program cut at the two exchanges, so the pipeline runtime
can run other work while tokens are on the wire: ``route`` (router, gates, TP
slice, dispatch plan, tokens packed with their gates, once per destination
rank) | dispatch | ``experts`` (one row per own expert, gated, summed back per
token) | combine; then ``finish`` (sum over ranks, TP gather, shared experts)
gives the layer's output.
``forward()`` runs exactly that program.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.distributed as dist

from mtrain.model.fp8 import fp8_rows
from mtrain.model.groups import ModelGroups
from mtrain.model.mlp import DenseMLP
from mtrain.model.moe.dispatch import DispatchPlan, make_dispatcher
from mtrain.model.moe.experts import GroupedExperts
from mtrain.model.moe.expert_tp import group_counts, run_split_experts
from mtrain.model.moe.router import Router, attach_aux_loss
from mtrain.model.tp import gather_from_tp, scatter_to_tp, tp_rank, tp_size
from mtrain.runtime.context import StepContext, maybe_recompute
from mtrain.runtime.program import Carry, Compute, Exchange, run_plain


@dataclass
class MoECarry(Carry):
    """What flows between the steps of a layer with an MoE MLP."""

    hidden: Optional[torch.Tensor] = None  # the residual stream
    normed: Optional[torch.Tensor] = None  # the MLP input, [B, S, H]
    rows: Optional[torch.Tensor] = None  # on the wire: a token with its gates per destination rank, then its sum
    plan: Optional[DispatchPlan] = None  # where the rows go and how they come back


class MoELayer(nn.Module):
    def __init__(self, cfg, groups: Optional[ModelGroups] = None):
        """With ``groups.fp8`` the shared and the routed experts' GEMMs are FP8
        and the dispatch carries FP8 tiles; the router and the combine are not
        (docs/fp8.md)."""
        super().__init__()
        g = groups or ModelGroups()
        tp_group, ep_group, expert_tp_group = g.tp, g.ep, g.expert_tp
        ep = 1 if ep_group is None else dist.get_world_size(ep_group)
        expert_tp = 1 if expert_tp_group is None else dist.get_world_size(expert_tp_group)
        if cfg.moe_ffn_hidden_size % expert_tp:
            raise ValueError(f"model.moe_ffn_hidden_size={cfg.moe_ffn_hidden_size} does not split over "
                             f"parallel.expert_tp={expert_tp}")
        self.tp_group = tp_group
        self.expert_tp_group = expert_tp_group if expert_tp > 1 else None
        self.router = Router(cfg, cfg.init_std, nodes=g.ep_nodes)
        self.experts = GroupedExperts(cfg.num_routed_experts // ep, cfg.hidden_size,
                                      cfg.moe_ffn_hidden_size // expert_tp, cfg.init_std, cfg.grouped_gemm,
                                      cfg.compile, fp8=g.fp8)
        self.shared = (DenseMLP(cfg.hidden_size, cfg.num_shared_experts * cfg.moe_ffn_hidden_size, tp_group, cfg.init_std,
                                cfg.compile, fp8=g.fp8) if cfg.num_shared_experts else None)
        self.dispatcher = make_dispatcher(g.dispatcher, cfg.num_routed_experts, ep_group, g.deepep_num_sms,
                                          cfg.hidden_size, hop_groups=g.ep_hops, fp8=g.fp8)
        self.recompute = cfg.recompute == "full"

    def forward(self, x_norm: torch.Tensor, step: Optional[StepContext] = None) -> torch.Tensor:
        return run_plain(self.standalone_program(), MoECarry(normed=x_norm), step or StepContext()).hidden

    def standalone_program(self, name: str = "moe") -> list:
        """The layer on its own: the routed program, then its output in ``hidden``."""
        return self.program(name) + [Compute(lambda c, step: c.replace(hidden=self.output(c)), f"{name}.output")]

    def program(self, name: str = "moe") -> list:
        """The routed path as steps over an :class:`MoECarry` (``normed`` set)."""
        return [
            Compute(self._route_step, f"{name}.route"),
            # Both sent row tensors come out of cat/index_select and index_add, which keep
            # nothing of their output for the backward: release them after the exchange.
            # The received tokens are read by ``expand``'s split and index_select, which keep
            # nothing of them (unless full recompute runs the experts step again from them),
            # and the combined rows once, by ``output``'s index_add: free each after its reader.
            Exchange("rows", lambda c: c.plan.dispatch_op, f"{name}.dispatch", release_sent=True,
                     release_received=not self.recompute),
            Compute(self._experts_step, f"{name}.experts"),
            Exchange("rows", lambda c: c.plan.combine_op, f"{name}.combine", release_sent=True,
                     release_received=True),
        ]

    def output(self, carry: MoECarry) -> torch.Tensor:
        """The layer's output from the combined rows (after the program)."""
        return self.finish(carry.rows, carry.normed, carry.plan)

    def _route_step(self, c: MoECarry, step: StepContext) -> MoECarry:
        rows, plan = self.route(c.normed, step)
        return c.replace(rows=rows, plan=plan)

    def _experts_step(self, c: MoECarry, step: StepContext) -> MoECarry:
        return c.replace(rows=maybe_recompute(self.recompute, self.compute_experts, c.rows, c.plan))

    def route(self, x_norm: torch.Tensor, step: StepContext) -> tuple[torch.Tensor, DispatchPlan]:
        """Rows to dispatch (tokens with their gates) and the plan, for tokens ``x_norm`` [B, S, H].

        Routing runs on every token on every TP rank (identical there); with
        tp > 1 each TP rank then dispatches a distinct slice of the tokens, so no
        expert work is repeated, and ``finish`` gathers the slices back.
        """
        batch = x_norm.shape[0]
        flat = x_norm.reshape(-1, x_norm.shape[-1])
        routing = self.router(flat)
        weights = routing.topk_weights
        if self.training and self.router.aux_alpha > 0:
            aux = self.router.sequence_aux_loss(routing, batch)
            step.aux_losses.append(aux.detach())
            weights = attach_aux_loss(weights, aux, step.loss_scale)
        idx = routing.topk_idx
        tp = tp_size(self.tp_group)
        if tp > 1:
            if flat.shape[0] % tp:
                raise ValueError(f"{flat.shape[0]} tokens per micro-batch do not split over tp={tp}: "
                                 f"make micro_batch_size * seq_len a multiple of tp")
            flat = scatter_to_tp(flat, 0, self.tp_group)
            weights = scatter_to_tp(weights, 0, self.tp_group)
            idx = idx.chunk(tp, 0)[tp_rank(self.tp_group)]
        plan = self.dispatcher.plan(idx)
        return self.dispatcher.pack(flat, weights, plan), plan

    def compute_experts(self, received: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Received tokens [N, H + k] -> their gated expert outputs summed per token [N, H].
        With an FP8 dispatch the received tiles feed gate and up as they arrived."""
        grouped, gates = self.dispatcher.expand(received, plan)
        tiles = None
        if plan.received_tiles is not None:
            data, scales = plan.received_tiles
            tiles = fp8_rows(data, plan.row_token), scales.index_select(0, plan.row_token)
            if not self.recompute:  # read once, like the received rows (released after this step)
                plan.received_tiles = None
        if self.expert_tp_group is None:
            out = self.experts(grouped, plan.tokens_per_expert, tiles)
        else:
            if plan.expert_tp_counts is None:
                plan.expert_tp_counts = group_counts(plan.tokens_per_expert, self.expert_tp_group, received.device)
            out = run_split_experts(self.experts, grouped, plan.expert_tp_counts, self.expert_tp_group, tiles)
        return self.dispatcher.reduce(out, gates, plan)

    def finish(self, rows: torch.Tensor, x_norm: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        y = self.dispatcher.unpack(rows, plan).to(x_norm.dtype)
        if tp_size(self.tp_group) > 1:
            y = gather_from_tp(y, 0, self.tp_group)
        y = y.view_as(x_norm)
        if self.shared is not None:
            y = y + self.shared(x_norm)
        return y


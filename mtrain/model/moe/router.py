"""DeepSeek-V3 routing: sigmoid (or softmax) scores, group-limited top-k,
expert bias for selection only (aux-loss-free balancing) and the
complementary sequence-wise auxiliary loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtrain.model.params import tag

class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also seeds ``aux_loss`` with ``scale``,
    so the auxiliary loss trains the router without travelling down the pipeline."""

    @staticmethod
    def forward(ctx, x, aux_loss, scale):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(x: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale``: the main loss's factor (1/micro-batches), so both train alike."""
    return _AttachAuxLoss.apply(x, aux_loss, scale)


@dataclass
class Routing:
    topk_idx: torch.Tensor  # [T, k] int64, global expert ids
    topk_weights: torch.Tensor  # [T, k] gate values (differentiable)
    scores: torch.Tensor  # [T, E] raw scores


class Router(nn.Module):
    def __init__(self, cfg, init_std: float):
        super().__init__()
        self.num_experts = cfg.num_routed_experts
        self.topk = cfg.moe_topk
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.score_func = cfg.score_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.aux_alpha = cfg.aux_loss_alpha
        self.weight = tag(nn.Parameter(torch.empty(self.num_experts, cfg.hidden_size)))
        nn.init.normal_(self.weight, std=init_std)
        # Selection-only bias, moved by the trainer after every step (not by autograd).
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))
        # Tokens routed to each expert since the last bias update (this rank only).
        self.register_buffer("load", torch.zeros(self.num_experts), persistent=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids under group-limited routing; the bias steers selection only."""
        biased = scores.detach() + self.expert_bias
        tokens = biased.shape[0]
        if self.n_group > 1:
            grouped = biased.view(tokens, self.n_group, -1)
            per_group = max(1, self.topk // self.topk_group)
            group_scores = grouped.topk(per_group, dim=-1).values.sum(-1)
            kept = group_scores.topk(self.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            biased = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(tokens, -1)
        return biased.topk(self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x`` [T, H] (T = batch_size * seq tokens, sequence-major)."""
        scores = self.scores(x)
        idx = self.select(scores)
        weights = scores.gather(1, idx)
        if self.norm_topk_prob and self.topk > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        with torch.no_grad():
            self.load.index_add_(0, idx.flatten(), torch.ones(idx.numel(), dtype=self.load.dtype, device=idx.device))
        return Routing(idx, weights.to(x.dtype), scores)

    def sequence_aux_loss(self, routing: Routing, batch_size: int) -> torch.Tensor:
        """alpha * sum_i f_i * P_i per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20)."""
        tokens, experts = routing.scores.shape
        seq = tokens // batch_size
        probs = routing.scores / routing.scores.sum(-1, keepdim=True)
        p = probs.view(batch_size, seq, experts).mean(1)
        counts = torch.zeros(batch_size, experts, device=probs.device)
        counts.scatter_add_(1, routing.topk_idx.view(batch_size, -1), torch.ones(batch_size, seq * self.topk, device=probs.device))
        f = counts * experts / (self.topk * seq)
        return self.aux_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, global_load: torch.Tensor, speed: float) -> None:
        """Move each bias by ``speed`` toward balance: down when over-loaded, up when under."""
        mean = global_load.float().mean()
        self.expert_bias += speed * torch.sign(mean - global_load.float())
        self.load.zero_()

"""DeepSeek-V3 routing: sigmoid (or softmax) scores, group-limited top-k,
expert bias for selection only (aux-loss-free balancing) and the
complementary sequence-wise auxiliary loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtrain.model.compiled import compiled
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


def router_scores(x: torch.Tensor, weight: torch.Tensor, score_func: str) -> torch.Tensor:
    """Expert affinities [T, E], in fp32."""
    logits = F.linear(x.float(), weight.float())
    return logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)


def limit_nodes(biased: torch.Tensor, nodes: int, max_nodes: int, topk: int) -> torch.Tensor:
    """DeepSeek-V3's node-limited routing: keep the experts of the ``max_nodes``
    nodes (of ``nodes`` equal blocks of experts) whose ``topk // max_nodes``
    highest biased scores sum highest; the others get -inf. Experts already
    excluded (-inf) count for nothing; a node with none left is never kept."""
    tokens = biased.shape[0]
    per_node = biased.view(tokens, nodes, -1)
    best = per_node.topk(topk // max_nodes, dim=-1).values
    node_scores = best.masked_fill(best == float("-inf"), 0).sum(-1)
    node_scores = node_scores.masked_fill((per_node == float("-inf")).all(-1), float("-inf"))
    kept = node_scores.topk(max_nodes, dim=-1).indices
    mask = torch.zeros_like(node_scores, dtype=torch.bool).scatter_(1, kept, True)
    return per_node.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(tokens, -1)


def select_experts(scores: torch.Tensor, bias: torch.Tensor, topk: int, n_group: int, topk_group: int,
                   group_score: str = "top2_sum", nodes: int = 1, max_nodes: int = 0) -> torch.Tensor:
    """Top-k expert ids [T, k] of ``scores + bias`` (the bias steers selection
    only). With groups only the ``topk_group`` best groups compete; a group's
    score is the sum of its two highest biased scores (``top2_sum``,
    DeepSeek-V3) or its highest one (``max``, DeepSeek-V2's group_limited_greedy).
    With ``max_nodes`` (> 0, fewer than ``nodes``) the experts then also come
    from at most that many nodes (:func:`limit_nodes`)."""
    biased = scores.detach() + bias
    if n_group > 1:
        tokens = biased.shape[0]
        grouped = biased.view(tokens, n_group, -1)
        if group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        biased = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(tokens, -1)
    if 0 < max_nodes < nodes:
        biased = limit_nodes(biased, nodes, max_nodes, topk)
    return biased.topk(topk, dim=-1).indices


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, topk: int, n_group: int, topk_group: int,
          score_func: str, norm_topk_prob: bool, scaling: float, group_score: str = "top2_sum", nodes: int = 1,
          max_nodes: int = 0):
    """``(expert ids [T, k], gates [T, k] in x's dtype, scores [T, E])`` for tokens ``x`` [T, H].
    Gates are the unbiased scores of the chosen experts; normalised to sum to
    one when ``norm_topk_prob`` (top-1 included, as DeepSeek-V3's gate does),
    then scaled by the routed scaling factor."""
    scores = router_scores(x, weight, score_func)
    idx = select_experts(scores, bias, topk, n_group, topk_group, group_score, nodes, max_nodes)
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return idx, (weights * scaling).to(x.dtype), scores


def sequence_aux_loss(scores: torch.Tensor, idx: torch.Tensor, batch_size: int, topk: int,
                      alpha: float) -> torch.Tensor:
    """alpha * sum_i f_i * P_i per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20)."""
    tokens, experts = scores.shape
    seq = tokens // batch_size
    probs = scores / scores.sum(-1, keepdim=True)
    p = probs.view(batch_size, seq, experts).mean(1)
    counts = torch.zeros(batch_size, experts, device=probs.device)
    counts.scatter_add_(1, idx.view(batch_size, -1), torch.ones(batch_size, seq * topk, device=probs.device))
    f = counts * experts / (topk * seq)
    return alpha * (f * p).sum(-1).mean()


@dataclass
class Routing:
    topk_idx: torch.Tensor  # [T, k] int64, global expert ids
    topk_weights: torch.Tensor  # [T, k] gate values (differentiable)
    scores: torch.Tensor  # [T, E] raw scores


class Router(nn.Module):
    def __init__(self, cfg, init_std: float, nodes: int = 1):
        """``nodes``: how many nodes the experts are spread over (equal blocks,
        in expert order), for ``model.max_nodes_per_token``."""
        super().__init__()
        self.nodes, self.max_nodes = nodes, cfg.max_nodes_per_token
        self.num_experts = cfg.num_routed_experts
        self.topk = cfg.moe_topk
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.group_score = str(cfg.group_score)
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
        self._route = compiled(route, cfg.compile)
        self._aux_loss = compiled(sequence_aux_loss, cfg.compile)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return router_scores(x, self.weight, self.score_func)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids under group-limited routing; the bias steers selection only."""
        return select_experts(scores, self.expert_bias, self.topk, self.n_group, self.topk_group, self.group_score,
                              self.nodes, self.max_nodes)

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x`` [T, H] (T = batch_size * seq tokens, sequence-major)."""
        idx, weights, scores = self._route(x, self.weight, self.expert_bias, self.topk, self.n_group,
                                           self.topk_group, self.score_func, self.norm_topk_prob, self.scaling,
                                           self.group_score, self.nodes, self.max_nodes)
        if self.training:  # evaluation (eval mode) must not steer the next bias update
            with torch.no_grad():
                self.load.index_add_(0, idx.flatten(), torch.ones(idx.numel(), dtype=self.load.dtype,
                                                                  device=idx.device))
        return Routing(idx, weights, scores)

    def sequence_aux_loss(self, routing: Routing, batch_size: int) -> torch.Tensor:
        """alpha * sum_i f_i * P_i per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20)."""
        return self._aux_loss(routing.scores, routing.topk_idx, batch_size, self.topk, self.aux_alpha)

    @torch.no_grad()
    def update_bias(self, global_load: torch.Tensor, speed: float) -> None:
        """Move each bias by ``speed`` toward balance: down when over-loaded, up when under."""
        mean = global_load.float().mean()
        self.expert_bias += speed * torch.sign(mean - global_load.float())
        self.load.zero_()

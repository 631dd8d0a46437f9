import math

import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.model.moe.router import Router


def make_router(**overrides):
    cfg = load_config([f"model.{k}={v}" for k, v in overrides.items()]).model
    torch.manual_seed(0)
    return Router(cfg, init_std=0.5), cfg


def test_bias_changes_selection_but_not_gates():
    router, cfg = make_router(n_group=1, topk_group=1)
    x = torch.randn(64, cfg.hidden_size)
    before = router(x)
    router.expert_bias[3] = 10.0  # expert 3 now wins every selection
    after = router(x)
    assert (after.topk_idx == 3).any(-1).all()
    assert not torch.equal(before.topk_idx, after.topk_idx)
    # Gates are the raw scores of the selected experts, renormalised and scaled: the bias is absent.
    raw = after.scores.gather(1, after.topk_idx)
    expected = raw / raw.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(after.topk_weights, expected)


def test_no_token_leaves_its_kept_groups():
    router, cfg = make_router(num_routed_experts=16, n_group=4, topk_group=2, moe_topk=4)
    x = torch.randn(256, cfg.hidden_size)
    r = router(x)
    per_group = 16 // 4
    grouped = (r.scores.detach() + router.expert_bias).view(256, 4, per_group)
    group_score = grouped.topk(4 // 2, dim=-1).values.sum(-1)
    kept = group_score.topk(2, dim=-1).indices
    chosen_groups = r.topk_idx // per_group
    for t in range(256):
        assert set(chosen_groups[t].tolist()) <= set(kept[t].tolist())
    # Within the kept groups the choice is the plain top-k.
    masked = torch.full_like(r.scores, float("-inf"))
    for t in range(256):
        for g in kept[t].tolist():
            masked[t, g * per_group:(g + 1) * per_group] = r.scores[t, g * per_group:(g + 1) * per_group]
    assert torch.equal(r.topk_idx.sort(-1).values, masked.topk(4, -1).indices.sort(-1).values)


def _imbalance_over_steps(gamma: float, steps: int = 60) -> list[float]:
    router, cfg = make_router(n_group=1, topk_group=1)
    with torch.no_grad():
        router.weight[0] += 2.0  # expert 0 is favoured by every token
    gen = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(steps):
        x = torch.randn(128, cfg.hidden_size, generator=gen) + 0.5
        router(x)
        load = router.load.clone()
        ratios.append((load.max() / load.mean()).item())
        router.update_bias(load, gamma)
    return ratios


def test_bias_update_balances_load():
    balanced = _imbalance_over_steps(0.05)
    frozen = _imbalance_over_steps(0.0)
    assert balanced[-1] < 0.6 * balanced[0]
    assert frozen[-1] == pytest.approx(frozen[0], rel=0.25)
    assert balanced[-1] < frozen[-1]


def test_sequence_aux_loss_hand_computed():
    router, cfg = make_router(num_routed_experts=4, n_group=1, topk_group=1, moe_topk=2, aux_loss_alpha=0.1)
    # One sequence of 2 tokens over 4 experts with fixed scores and selections.
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.4]])
    idx = torch.tensor([[0, 2], [1, 2]])
    from mtrain.model.moe.router import Routing
    loss = router.sequence_aux_loss(Routing(idx, None, scores), batch_size=1)
    # f_i = N_r / (K_r T) * count_i = 4 / (2*2) * count = count; P_i = mean normalised score.
    f = torch.tensor([1.0, 1.0, 2.0, 0.0])
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    assert loss.item() == pytest.approx(0.1 * (f * p).sum().item(), rel=1e-6)


def test_loads_are_counted():
    router, cfg = make_router()
    x = torch.randn(10, cfg.hidden_size)
    r = router(x)
    assert router.load.sum().item() == 10 * cfg.moe_topk
    assert torch.equal(router.load, torch.bincount(r.topk_idx.flatten(), minlength=cfg.num_routed_experts).float())


# --- against transformers' DeepSeek-V3 router -----------------------------------------------

def assert_same_routing(router, reference, x):
    """Same experts and gates per token as a transformers router (which returns its top-k unsorted)."""
    ours = router(x)
    _, ref_weights, ref_idx = reference(x)
    order, ref_order = ours.topk_idx.argsort(-1), ref_idx.argsort(-1)
    assert torch.equal(ours.topk_idx.gather(1, order), ref_idx.gather(1, ref_order))
    torch.testing.assert_close(ours.topk_weights.gather(1, order), ref_weights.gather(1, ref_order),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("experts,n_group,topk_group,topk,norm", [
    (16, 4, 1, 4, True),  # one group holds all four: a group's score is still its two best
    (16, 4, 2, 1, True),  # top-1: the gate is normalised to 1 (times the scaling), as V3's
    (16, 4, 2, 1, False),
    (32, 8, 4, 8, True),  # V3's ratios at a small scale
    (12, 3, 2, 3, False),
    (8, 1, 1, 2, True),  # no groups
])
def test_routing_matches_transformers_deepseek_v3(experts, n_group, topk_group, topk, norm):
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from mtrain.model.hf import hf_config

    router, cfg = make_router(num_routed_experts=experts, n_group=n_group, topk_group=topk_group, moe_topk=topk,
                              norm_topk_prob=norm, routed_scaling_factor=2.5)
    gen = torch.Generator().manual_seed(experts + topk)
    with torch.no_grad():
        router.weight.normal_(0, 0.5, generator=gen)
        router.expert_bias.copy_(torch.randn(experts, generator=gen) * 0.05)
    reference = DeepseekV3TopkRouter(hf_config(cfg))
    reference.weight.data.copy_(router.weight.data)
    reference.e_score_correction_bias.copy_(router.expert_bias)
    x = torch.randn(300, cfg.hidden_size, generator=gen)

    assert_same_routing(router, reference, x)


@pytest.mark.parametrize("experts,n_group,topk_group,topk", [
    (16, 4, 2, 3),  # group_limited_greedy: a group's score is its best expert's
    (16, 8, 3, 4),
    (8, 8, 3, 2),  # one expert per group: allowed when groups are scored by their best
    (12, 1, 1, 3),  # greedy: no groups (DeepSeek-V2-Lite)
])
def test_routing_matches_transformers_deepseek_v2(experts, n_group, topk_group, topk):
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    from mtrain.model.hf import hf_config

    router, cfg = make_router(num_routed_experts=experts, n_group=n_group, topk_group=topk_group, moe_topk=topk,
                              score_func="softmax", group_score="max", norm_topk_prob=False,
                              routed_scaling_factor=2.0)
    gen = torch.Generator().manual_seed(experts * topk)
    with torch.no_grad():
        router.weight.normal_(0, 0.5, generator=gen)
    reference = DeepseekV2TopkRouter(hf_config(cfg))
    assert reference.topk_method == ("group_limited_greedy" if n_group > 1 else "greedy")
    reference.weight.data.copy_(router.weight.data)
    x = torch.randn(300, cfg.hidden_size, generator=gen)

    assert_same_routing(router, reference, x)


# --- node-limited routing ---------------------------------------------------------------------

def test_node_limit_keeps_at_most_m_nodes_chosen_by_their_top_scores():
    from mtrain.model.moe.router import select_experts

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(500, 32, generator=gen)
    bias = torch.zeros(32)
    idx = select_experts(scores, bias, topk=8, n_group=1, topk_group=1, nodes=8, max_nodes=2)
    nodes = idx // 4
    assert all(len(set(row.tolist())) <= 2 for row in nodes)
    # The kept nodes are those whose top-4 (8 / 2) scores sum highest, and within them the top 8 experts.
    node_scores = scores.view(500, 8, 4).topk(4, dim=-1).values.sum(-1)
    best = node_scores.topk(2, dim=-1).indices.sort(-1).values
    for t in range(500):
        assert set(nodes[t].tolist()) == set(best[t].tolist())
        allowed = torch.cat([torch.arange(n * 4, n * 4 + 4) for n in best[t].tolist()])
        expected = allowed[scores[t, allowed].topk(8).indices]
        assert set(idx[t].tolist()) == set(expected.tolist())


def test_node_limit_equals_group_limit_when_groups_are_the_nodes():
    """DeepSeek-V3's own setting: 8 groups keep 4 == 8 nodes keep 4 (top-2 sums both)."""
    from mtrain.model.moe.router import select_experts

    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(400, 64, generator=gen)
    bias = torch.randn(64, generator=gen) * 0.01
    by_groups = select_experts(scores, bias, topk=8, n_group=8, topk_group=4)
    by_nodes = select_experts(scores, bias, topk=8, n_group=1, topk_group=1, nodes=8, max_nodes=4)
    both = select_experts(scores, bias, topk=8, n_group=8, topk_group=4, nodes=8, max_nodes=4)
    assert torch.equal(by_groups.sort(-1).values, by_nodes.sort(-1).values)
    assert torch.equal(by_groups.sort(-1).values, both.sort(-1).values)

"""The alltoall dispatcher's two-level exchange on 4 gloo ranks seen as 2
nodes x 2: across nodes once per destination node (to the rank of the same
index there), then forwarded inside the node.

fp32; the combine sums in another order than the one-level exchange and the
single process: rtol 1e-4, atol 2e-6 (as tests/dist/test_model_parallel.py).
"""
import pytest
import torch
import torch.distributed as dist

from mtrain.config.loading import load_config
from mtrain.model.model import initialize
from mtrain.model.moe.dispatch import Dispatcher
from mtrain.model.groups import ModelGroups
from mtrain.model.moe.layer import MoELayer
from mtrain.model.params import meta
from mtrain.model.sharding import shard_tensor
from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.runtime.comm import TwoHopOp, communicate
from mtrain.runtime.context import StepContext
from mtrain.testing import run_distributed
from mtrain.testing.syncs import HostSyncCounter

SEED = 7
RTOL, ATOL = 1e-4, 2e-6
WORLD, PER_NODE = 4, 2
# Top-4 of 8 experts from both groups: tokens reach both nodes and several ranks of one.
ROUTING = ["model.moe_topk=4", "model.topk_group=2"]


def layer_input(rank: int, hidden: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 8, hidden, generator=g), torch.randn(2, 8, hidden, generator=g)


def run_layer(moe, rank: int):
    """Output, input gradient and parameter gradients of ``moe`` on ``rank``'s
    tokens, with the host syncs of its forward and backward."""
    x, weight = layer_input(rank, moe.router.weight.shape[1])
    x.requires_grad_(True)
    with HostSyncCounter() as forward:
        y = moe(x, StepContext())
    with HostSyncCounter() as backward:
        (y * weight).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "grads": {n: p.grad for n, p in moe.named_parameters()},
            "syncs": (forward.count, backward.count)}


def _layer_worker():
    groups = create_groups(build_layout(WORLD, ep=WORLD), timeout_s=30)
    cfg = load_config(ROUTING).model
    moe = MoELayer(cfg, ModelGroups(ep=groups.group("ep"), dispatcher="alltoall", ep_hops=groups.ep_hops(PER_NODE)))
    assert moe.dispatcher.nodes == 2 and moe.dispatcher.node_size == PER_NODE
    initialize(moe, SEED, cfg.init_std, {"ep": (groups.index("ep"), WORLD)})
    return run_layer(moe, dist.get_rank())


def test_two_level_moe_layer_matches_single_process():
    results = run_distributed(_layer_worker, WORLD, timeout=60)
    cfg = load_config(ROUTING).model
    reference = MoELayer(cfg, ModelGroups(dispatcher="alltoall"))
    initialize(reference, SEED, cfg.init_std)
    params = dict(reference.named_parameters())
    refs = []
    for rank in range(WORLD):
        reference.zero_grad()
        refs.append(run_layer(reference, rank))
    for rank, (res, ref) in enumerate(zip(results, refs)):
        assert res["syncs"] == (1, 0), f"rank {rank}: one host read per plan, none in the backward"
        torch.testing.assert_close(res["y"], ref["y"], rtol=RTOL, atol=ATOL, msg=lambda s: f"rank {rank} output: {s}")
        torch.testing.assert_close(res["dx"], ref["dx"], rtol=RTOL, atol=ATOL, msg=lambda s: f"rank {rank} dx: {s}")
        for name, grad in res["grads"].items():
            m = meta(params[name])
            # Experts see every rank's tokens: their full gradient sums the reference over ranks.
            full = sum(r["grads"][name] for r in refs) if m.expert else ref["grads"][name]
            expected = shard_tensor(full, m, {"ep": (rank, WORLD)}, name)
            torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL, msg=lambda s: f"rank {rank} {name}: {s}")


EXPERTS, TOPK, HIDDEN = 16, 4, 6
TOKENS = [7, 0, 5, 9]  # rank 1 routes nothing but still forwards and receives


def routing(rank: int):
    """Distinct experts per token, plus a token kept on this rank and one sent
    to a single rank of the other node."""
    g = torch.Generator().manual_seed(rank)
    idx = torch.rand(TOKENS[rank], EXPERTS, generator=g).argsort(1)[:, :TOPK]
    if TOKENS[rank]:
        per_rank = EXPERTS // WORLD
        idx[0] = torch.arange(TOPK) + rank * per_rank
        idx[-1] = torch.arange(TOPK) + ((rank + PER_NODE) % WORLD) * per_rank
    gates = torch.rand(TOKENS[rank], TOPK, generator=g)
    return idx, gates


def _dispatch_worker():
    rank = dist.get_rank()
    ep_group = dist.new_group(list(range(WORLD)))
    node_group, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    rail_group, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    d = Dispatcher(EXPERTS, ep_group, (node_group, rail_group))
    idx, gates = routing(rank)
    plan = d.plan(idx)
    assert isinstance(plan.dispatch_op, TwoHopOp)
    rail_send = plan.dispatch_op.first.send_splits
    # Each token a row (hidden = its source rank and index), through dispatch, identity experts and combine.
    x = torch.stack([torch.full((TOKENS[rank],), float(rank)), torch.arange(float(TOKENS[rank]))]
                    + [torch.randn(TOKENS[rank]) for _ in range(HIDDEN - 2)], 1).requires_grad_(True)
    gates.requires_grad_(True)
    received = communicate(d.pack(x, gates, plan), plan.dispatch_op)
    rows, row_gates = d.expand(received, plan)
    arrived = [(int(e), int(r[0]), int(r[1]), float(g)) for e, r, g in
               zip(torch.repeat_interleave(torch.arange(d.num_local), torch.tensor(plan.tokens_per_expert)),
                   rows.detach(), row_gates.detach().flatten())]
    y = d.unpack(communicate(d.reduce(rows, row_gates, plan), plan.combine_op), plan)
    y.sum().backward()
    return {"rail_send": rail_send, "arrived": arrived, "y": y.detach(), "x": x.detach(),
            "dx": x.grad, "dgates": gates.grad}


def test_two_level_plan_crosses_nodes_once_per_node_and_delivers_every_expert_row():
    results = run_distributed(_dispatch_worker, WORLD, timeout=60)
    per_rank = EXPERTS // WORLD
    two_level_total = one_level_total = 0
    for rank, res in enumerate(results):
        idx, gates = routing(rank)
        node = rank // PER_NODE
        # By hand: the other nodes holding one of each token's experts, and (one level) the other-node ranks.
        other_nodes = sum(len({int(e) // (per_rank * PER_NODE) for e in row} - {node}) for row in idx)
        other_node_ranks = sum(len({int(e) // per_rank for e in row if int(e) // (per_rank * PER_NODE) != node})
                               for row in idx)
        crossing = sum(res["rail_send"]) - res["rail_send"][node]
        assert crossing == other_nodes, rank
        assert crossing <= other_node_ranks
        two_level_total, one_level_total = two_level_total + crossing, one_level_total + other_node_ranks
        # The sum of gates times the token itself (identity experts), and its transpose.
        expected = gates.sum(1, keepdim=True) * res["x"]
        torch.testing.assert_close(res["y"], expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(res["dx"], gates.sum(1, keepdim=True).expand_as(res["x"]), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(res["dgates"], res["x"].sum(1, keepdim=True).expand_as(gates), rtol=RTOL, atol=ATOL)
    assert two_level_total < one_level_total
    # Every (expert, source token) row arrives exactly once, with its gate, at the expert's rank.
    for rank, res in enumerate(results):
        expected = sorted((int(e) % per_rank, source, t, float(g))
                          for source in range(WORLD) for t, (row, grow) in enumerate(zip(*routing(source)))
                          for e, g in zip(row, grow) if int(e) // per_rank == rank)
        assert sorted(res["arrived"]) == expected, rank


def _train_worker(overrides, run_dir):
    from mtrain.train.trainer import Trainer

    base = ["model.num_layers=2", "train.micro_batch_size=1", "data.seq_len=16", "train.lr=3e-3",
            "train.warmup_steps=1", "logging.wandb=false", "logging.progress=false", "checkpoint.resume=none",
            "train.collective_timeout_s=50", "parallel.pp=1", "parallel.ep=4", "parallel.schedule=1f1b",
            "parallel.num_microbatches=2", "parallel.ep_ranks_per_node=2", "parallel.dispatcher=alltoall"]
    trainer = Trainer(load_config(base + ROUTING + overrides + [f"run_dir={run_dir}"]), run_dir)
    trainer.maybe_resume()
    hops = {2 if m.dispatcher.node_group is not None else 1
            for chunk in trainer.chunks.values() for m in chunk.modules() if isinstance(m, MoELayer)}
    return hops, [trainer.train_step()["loss"] for _ in range(3)]


def test_training_with_two_level_dispatch_matches_one_level(tmp_path):
    one = run_distributed(_train_worker, WORLD, ["parallel.dispatch_hops=1"], str(tmp_path / "one"), timeout=90)
    two = run_distributed(_train_worker, WORLD, [], str(tmp_path / "two"), timeout=90)  # auto: 2 nodes, 2 hops
    assert one[0][0] == {1} and two[0][0] == {2}
    for rank in range(WORLD):
        assert two[rank][1] == pytest.approx(one[rank][1], rel=1e-5), rank


def test_overlapped_pipeline_with_two_level_dispatch_matches_single_process():
    """DualPipe runs one micro-batch's exchanges while another computes: the
    two-hop ops in flight there (2 nodes of one EP rank each, so the node hop
    stays on the rank) must give the single-process gradients."""
    from tests.dist.test_pipeline_model import CASES, _rank_step, config, reference

    world, overrides = CASES["dualpipe pp2 ep2 dp2"]
    overrides = overrides + ROUTING + ["parallel.ep_ranks_per_node=1"]
    results = run_distributed(_rank_step, world, overrides, world, timeout=90)
    cfg = config(overrides)
    model, ref_losses = reference(cfg, 2)
    n = cfg.parallel.num_microbatches
    got = {r["dp"] * n + mb: loss for r in results for mb, loss in r["losses"].items()}
    assert got == pytest.approx(dict(enumerate(ref_losses)), rel=RTOL, abs=ATOL)
    params = dict(model.named_parameters())
    for rank, res in enumerate(results):
        for name, grad in res["grads"].items():
            expected = shard_tensor(params[name].grad, meta(params[name]), res["coords"], name)
            torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL, msg=lambda s: f"rank {rank} {name}: {s}")

"""FP8 dispatch payloads on the alltoall backend (docs/fp8.md): the tokens
cross as E4M3 tiles with fp32 scales, the experts' Fprop uses them as they
arrive; in the backward the output gradient crosses toward the experts as
FP8 tiles too; the combine and the expert input's gradient stay high precision.

On 2 and 4 gloo ranks (one level, and two levels as 2 nodes x 2), the FP8
MoE layer equals the single-process FP8 layer run on every rank's tokens at
once (fp32; the combine sums in another order: rtol 1e-5), and quantizing
after the exchange instead gives the same bits. Each expert gets fewer than
128 rows, so its Wgrad's token tiles do not depend on the row order. With
expert_tp=2 the received tiles are gathered with the rows.
"""
import pytest
import torch
import torch.distributed as dist

from mtrain.config.loading import load_config
from mtrain.model.groups import ModelGroups
from mtrain.model.model import initialize
from mtrain.model.moe.fp8_dispatch import FP8GradientOp, FP8PayloadOp, payload_row_bytes
from mtrain.model.moe.layer import MoELayer
from mtrain.model.params import meta
from mtrain.model.sharding import shard_tensor
from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.runtime.comm import AllToAllOp, IdentityOp, TwoHopOp
from mtrain.runtime.context import StepContext
from mtrain.testing import run_distributed
from tests.unit.test_fp8 import FP8_TINY

SEED = 11
RTOL, ATOL = 1e-5, 1e-6
CONFIG = [*FP8_TINY, "model.aux_loss_alpha=0"]  # 8 experts, top-2 inside one of 2 groups of 4
EMPTY = 5  # no token picks this expert
BATCH, SEQ = 2, 8


def layer_input(rank: int, hidden: int):
    g = torch.Generator().manual_seed(200 + rank)
    return torch.randn(BATCH, SEQ, hidden, generator=g), torch.randn(BATCH, SEQ, hidden, generator=g)


def make_layer(groups: ModelGroups, ep_index=None, ffn: int = 128):
    cfg = load_config([*CONFIG, f"model.moe_ffn_hidden_size={ffn}"]).model
    moe = MoELayer(cfg, groups)
    initialize(moe, SEED, cfg.init_std, ep_index or {})
    moe.router.expert_bias[EMPTY] = -1e3
    return moe


def run(moe, x, weight):
    x = x.clone().requires_grad_(True)
    moe.zero_grad()
    y = moe(x, StepContext())
    loss = (y * weight).sum()
    loss.backward()
    return {"loss": loss.detach(), "y": y.detach(), "dx": x.grad,
            "grads": {n: p.grad.clone() for n, p in moe.named_parameters()}}


def _remote_rows(op, rank: int, node_size: int) -> int:
    """Rows this rank's dispatch sent to other ranks (both hops of a two-level one)."""
    if isinstance(op, IdentityOp):
        return 0
    if isinstance(op, AllToAllOp):
        return sum(op.send_splits) - op.send_splits[rank]
    assert isinstance(op, TwoHopOp)
    first, second = op.first.send_splits, op.second.send_splits
    return sum(first) - first[rank // node_size] + sum(second) - second[rank % node_size]


def _worker(world: int, per_node, expert_tp: int):
    rank, ep = dist.get_rank(), world // expert_tp
    groups = create_groups(build_layout(world, ep=ep, expert_tp=expert_tp), timeout_s=30)
    hops = groups.ep_hops(per_node) if per_node else None
    coords = {kind: (groups.index(kind), groups.size(kind)) for kind in ("ep", "expert_tp")}
    moe = make_layer(ModelGroups(ep=groups.group("ep"), expert_tp=groups.group("expert_tp"), dispatcher="alltoall",
                                 ep_hops=hops, fp8=True), coords, FFN[expert_tp])
    plans = []
    plan_of = moe.dispatcher.plan
    moe.dispatcher.plan = lambda idx: plans.append(plan_of(idx)) or plans[-1]
    x, weight = layer_input(rank, moe.router.weight.shape[1])
    out = {"wire": run(moe, x, weight)}
    moe.dispatcher.fp8_on_wire = False
    out["after"] = run(moe, x, weight)
    wire, after = (p.dispatch_op for p in plans)
    assert isinstance(wire, FP8PayloadOp) and wire.on_wire and not after.on_wire
    remote = _remote_rows(wire.inner, rank, per_node or world)
    out["bytes"] = {"fp8": remote * wire.row_bytes, "high": remote * after.row_bytes,
                    "row_fp8": wire.row_bytes, "row_high": after.row_bytes}
    # The combine's backward: the output gradient toward the experts, the same rows as the dispatch.
    wire_back, after_back = (p.combine_op for p in plans)
    assert isinstance(wire_back, FP8GradientOp) and wire_back.on_wire and not after_back.on_wire
    out["bytes"].update(back_fp8=wire_back.row_bytes, back_high=after_back.row_bytes)
    plan = plans[0]
    out["tokens_per_expert"] = plan.tokens_per_expert
    out["coords"] = coords
    # Tokens whose experts all sit on this rank: sent to no other rank.
    local = moe.experts.gate.shape[0]
    with torch.no_grad():
        owner = moe.router(x.reshape(-1, x.shape[-1])).topk_idx // local
    out["local_only"] = int((owner == groups.index("ep")).all(1).sum())
    return out


def reference(world: int, ffn: int):
    """The single-process FP8 layer on all ranks' tokens at once (what the
    routed experts see), and on each rank's tokens alone (what the shared
    experts see: their Wgrad tiles run over one rank's tokens)."""
    moe = make_layer(ModelGroups(dispatcher="alltoall", fp8=True), ffn=ffn)
    inputs = [layer_input(r, moe.router.weight.shape[1]) for r in range(world)]
    per_rank = [run(moe, x, weight) for x, weight in inputs]
    x, weight = (torch.cat(t) for t in zip(*inputs))
    return moe, run(moe, x, weight), per_rank


FFN = {1: 128, 2: 256}  # moe_ffn_hidden_size by expert_tp: one rank's slice is a whole 128 tile


@pytest.mark.parametrize("world,per_node,expert_tp", [(2, None, 1), (4, None, 1), (4, 2, 1), (2, None, 2)])
def test_fp8_dispatch_matches_single_process_and_quantizing_after(world, per_node, expert_tp):
    results = run_distributed(_worker, world, world, per_node, expert_tp, timeout=120)
    moe, ref, ref_per_rank = reference(world, FFN[expert_tp])
    params = dict(moe.named_parameters())
    hidden, topk = moe.router.weight.shape[1], moe.router.topk
    counts = [c for res in results if res["coords"]["expert_tp"][0] == 0 for c in res["tokens_per_expert"]]
    if expert_tp > 1:  # every expert_tp rank holds all experts and its own rows of them
        counts = [sum(c) for c in zip(*(res["tokens_per_expert"] for res in results))]
    assert counts[EMPTY] == 0 and all(c < 128 for c in counts), counts
    assert sum(r["local_only"] for r in results) > 0  # tokens sent to no other rank
    torch.testing.assert_close(sum(r["wire"]["loss"] for r in results), ref["loss"], rtol=RTOL, atol=ATOL)
    for rank, res in enumerate(results):
        wire, after = res["wire"], res["after"]
        # Quantizing before or after the exchange: the same bits.
        assert torch.equal(wire["y"], after["y"]) and torch.equal(wire["dx"], after["dx"]), rank
        assert all(torch.equal(g, after["grads"][n]) for n, g in wire["grads"].items()), rank
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        torch.testing.assert_close(wire["y"], ref["y"][rows], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(wire["dx"], ref["dx"][rows], rtol=RTOL, atol=ATOL)
        for name, grad in wire["grads"].items():
            m = meta(params[name])
            if m.expert:  # this rank's experts saw every rank's tokens
                expected = shard_tensor(ref["grads"][name], m, res["coords"], name)
            else:  # shared experts and router: each rank's own tokens; summed over ranks below
                continue
            torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL, msg=lambda s: f"rank {rank} {name}: {s}")
    for name in params:
        if not meta(params[name]).expert:
            total = sum(r["wire"]["grads"][name] for r in results)
            torch.testing.assert_close(total, sum(r["grads"][name] for r in ref_per_rank), rtol=RTOL, atol=ATOL,
                                       msg=name)
    # Bytes on the wire: fp8 data + fp32 scales (+ the gates) against the rows' own dtype (fp32 here).
    for res in results:
        b = res["bytes"]
        assert b["row_fp8"] == payload_row_bytes(hidden, topk, torch.float32, True) == hidden + hidden // 128 * 4 + topk * 4
        assert b["row_high"] == payload_row_bytes(hidden, topk, torch.float32, False) == (hidden + topk) * 4
        assert b["fp8"] * b["row_high"] == b["high"] * b["row_fp8"]
        assert (b["back_fp8"], b["back_high"]) == (hidden + hidden // 128 * 4, hidden * 4)
    assert (sum(r["bytes"]["fp8"] for r in results) > 0) == (world > expert_tp)  # nothing crosses at ep=1

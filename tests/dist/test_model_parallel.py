"""TP, EP and expert TP against the single-process model: same weights, same data, fp32.

Tolerance: rtol 1e-4, atol 2e-6 (different all-reduce summation orders; the
values are O(1e-2) to O(1)).
"""
import pytest
import torch
import torch.distributed as dist

from mtrain.config.loading import load_config
from mtrain.model.groups import ModelGroups
from mtrain.model.model import ModelChunk, initialize
from mtrain.model.params import meta
from mtrain.model.sharding import shard_tensor
from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.testing import run_distributed

SEED = 7
RTOL, ATOL = 1e-4, 2e-6


def model_cfg():
    return load_config(["model.mtp_depth=1"]).model


def data(dp_index: int, batch=2, seq=16):
    cfg = model_cfg()
    g = torch.Generator().manual_seed(100 + dp_index)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _rank_run(world, tp, ep, expert_tp=1):
    layout = build_layout(world, tp=tp, ep=ep, expert_tp=expert_tp)
    groups = create_groups(layout, timeout_s=30)
    coords = {kind: (groups.index(kind), groups.size(kind)) for kind in ("tp", "ep", "expert_tp")}
    cfg = model_cfg()
    chunk = ModelChunk(cfg, list(range(cfg.num_layers)),
                       groups=ModelGroups(tp=groups.group("tp"), ep=groups.group("ep"),
                                          expert_tp=groups.group("expert_tp"), dispatcher="alltoall"))
    initialize(chunk, SEED, cfg.init_std, coords)
    out = chunk(data(groups.index("dp")))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in chunk.named_parameters()}
    return {"loss": out.loss.item(), "lm": out.lm_loss.item(), "grads": grads, "coords": coords,
            "dp": groups.index("dp"), "expert_dp": groups.ranks("expert_dp")}


def reference(dp_indices):
    cfg = model_cfg()
    model = ModelChunk(cfg, list(range(cfg.num_layers)))
    initialize(model, SEED, cfg.init_std)
    out = {}
    for d in dp_indices:
        model.zero_grad()
        res = model(data(d))
        res.loss.backward()
        out[d] = (res.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return model, out


@pytest.mark.parametrize("tp,ep,expert_tp,world", [
    (2, 1, 1, 2), (1, 2, 1, 2), (1, 4, 1, 4), (2, 2, 1, 2), (2, 2, 1, 4), (2, 4, 1, 4),
    # Experts split in width over expert_tp (gathering rows of TP ranks, or of DP ranks).
    (2, 1, 2, 2), (1, 1, 2, 2), (2, 2, 2, 4), (1, 2, 2, 4),
])
def test_tp_ep_match_single_process(tp, ep, expert_tp, world):
    results = run_distributed(_rank_run, world, world, tp, ep, expert_tp, timeout=90)
    model, ref = reference(sorted({r["dp"] for r in results}))
    params = dict(model.named_parameters())
    for rank, res in enumerate(results):
        ref_loss, ref_grads = ref[res["dp"]]
        assert res["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL), f"rank {rank} loss"
        for name, grad in res["grads"].items():
            m = meta(params[name])
            if m.expert:
                # Every token of the stage reaches its experts exactly once across
                # the expert-DP group (TP ranks dispatch distinct slices), so the
                # expert-DP sum must equal the sum over all data (of this rank's
                # ep/expert_tp shard).
                grad = sum(results[s]["grads"][name] for s in res["expert_dp"])
                full = sum(g[name] for _, g in ref.values())
            else:
                full = ref_grads[name]
            expected = shard_tensor(full, m, res["coords"], name)
            torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL, msg=lambda s: f"rank {rank} {name}: {s}")

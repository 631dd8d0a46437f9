"""The planner: traffic against hand counts, op costs against the model's
FLOP count, calibration round trips, predictions' own arithmetic, and a
search that proposes only layouts the plan accepts and that fit."""
import itertools
import json
from math import comb

import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.model.stats import flops_per_token
from mtrain.pipeline.instructions import Overlap
from mtrain.pipeline.simulate import simulate
from mtrain.pipeline.trace import OpRecord, RankTrace, write_chrome_trace
from mtrain.planner.calibrate import TraceError, compare, measured_costs
from mtrain.planner.costs import stage_work
from mtrain.planner.hardware import ProfileError, hardware
from mtrain.planner.plan import make_plan
from mtrain.planner.predict import predict, setting
from mtrain.planner.search import search
from mtrain.planner.traffic import count_sends, destinations


# -- traffic -------------------------------------------------------------------

def test_count_sends_by_hand():
    # 8 experts on 4 GPUs (2 each), 2 GPUs per node: GPU g holds experts 2g, 2g+1; node = g // 2.
    ids = torch.tensor([[0, 1],   # from GPU 0: only itself -> nothing sent
                        [2, 7],   # from GPU 0: GPU 1 (same node) and GPU 3 (node 1, not GPU 0's index)
                        [4, 6],   # from GPU 1: GPUs 2 and 3, both on node 1
                        [4, 5]])  # from GPU 3: GPU 2 (same node)
    senders = torch.tensor([0, 0, 1, 3])
    one = count_sends(ids, senders, 8, 4, 2, hops=1)
    # remote nodes 0,1,1,0; other GPUs 0,2,2,1; IB: 0,1,2,0; NVLink: 0,1,0,1
    assert (one.remote_nodes, one.remote_gpus, one.ib_sends, one.nvlink_sends) == (0.5, 1.25, 0.75, 0.5)
    two = count_sends(ids, senders, 8, 4, 2, hops=2)
    # IB once per other node: 0,1,1,0. NVLink: token 1: GPU 1 (own node) + GPU 3 forwarded from GPU 2 = 2;
    # token 2: enters node 1 at GPU 3 (index 1), forwarded to GPU 2 = 1; token 3: GPU 2 = 1.
    assert (two.ib_sends, two.nvlink_sends) == (0.5, 1.0)
    assert (two.remote_nodes, two.remote_gpus) == (one.remote_nodes, one.remote_gpus)


def test_unlimited_top_k_matches_combinatorics():
    # Without groups or node limits top-k of random scores is a uniform k-subset:
    # P(GPU with e experts hit) = 1 - C(E-e, k) / C(E, k).
    E, k, ep, per_node = 32, 4, 8, 4
    d = destinations(E, k, 1, 1, "top2_sum", ep, per_node, 0, 1)
    p_gpu = 1 - comb(E - E // ep, k) / comb(E, k)
    p_node = 1 - comb(E - E // 2, k) / comb(E, k)
    assert d.remote_gpus == pytest.approx((ep - 1) * p_gpu, rel=0.03)
    assert d.remote_nodes == pytest.approx(p_node, rel=0.03)
    assert d.ib_sends == pytest.approx(per_node * p_gpu, rel=0.03)


def test_node_limit_caps_nodes_and_two_hops_send_fewer_ib_copies():
    args = dict(num_experts=64, topk=8, n_group=1, topk_group=1, group_score="top2_sum", ep=16, ep_per_node=2)
    free = destinations(**args, max_nodes=0, hops=2)
    limited = destinations(**args, max_nodes=2, hops=2)
    assert limited.remote_nodes <= 2 and free.remote_nodes > 2
    per_gpu = destinations(**args, max_nodes=2, hops=1)
    assert limited.ib_sends < per_gpu.ib_sends  # one copy per node instead of per GPU


# -- op costs --------------------------------------------------------------------

def _cfg(*overrides):
    return load_config(list(overrides), "plan")


@pytest.mark.parametrize("model", ["small", "deepseek_v3"])
def test_stage_forward_flops_sum_to_the_model_count(model):
    """The cost model counts FLOPs block by block; the model statistics count
    them from parameter totals. At tp=1 their forward FLOPs agree."""
    cfg = _cfg(f"model={model}", "cluster=h100", "cluster.nodes=4", "parallel.pp=4", "parallel.ep=8",
               "parallel.schedule=1f1b",
               "train.dtype=bf16", "data.seq_len=1024")
    plan = make_plan(cfg)
    assert not plan["errors"], plan["errors"]
    s = setting(cfg, hardware(cfg.cluster))
    total = sum(w.linear_flops + w.routed_flops + w.bf16_flops + w.attention_flops
                for w in (stage_work(cfg.model, s, st) for st in plan["stages"]))
    # ep=8 spreads the routed experts' rows over 8 GPUs but each GPU computes as many as its tokens send.
    assert total == pytest.approx(flops_per_token(cfg.model, 1024) / 3 * s.tokens, rel=1e-9)


# -- calibration ------------------------------------------------------------------

def _trace_of(sim, path):
    traces = [RankTrace(rank=r.rank, global_rank=r.rank, step_start=0.0, step_end=sim.makespan,
                        ops=[OpRecord(ins, start, start, end) for ins, start, end in r.timeline])
              for r in sim.ranks]
    write_chrome_trace(str(path), traces)
    return path


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_calibration_round_trip(tmp_path, schedule):
    """Costs read back from a trace of a simulated step give that step again."""
    stages = 4 if schedule == "dualpipev" else 2
    costs = [{"F": 1.0 + s, "B": 2.5 + s, "W": 0.75, "F_comm": 0.5, "B_comm": 0.25} for s in range(stages)]
    sim = simulate(schedule, 2, 6, stage_costs=costs, latency=0.2)
    measured = measured_costs(_trace_of(sim, tmp_path / "t.json"), stages, schedule, 2)
    assert measured["latency"] == pytest.approx(0.2)
    split = {op.stage for r in sim.ranks for ins, _, _ in r.timeline for op in ins.ops if op.kind == "W"}
    for stage, (got, want) in enumerate(zip(measured["stages"], costs)):
        assert (got["F"], got["B"]) == pytest.approx((want["F"], want["B"]))
        if stage in split:  # W is seen only where the schedule splits the backward
            assert got["W"] == pytest.approx(want["W"])
    result = compare(tmp_path / "t.json", schedule, 2, 6, stages)
    assert result["predicted_s"] == pytest.approx(sim.makespan) == pytest.approx(result["measured_s"])
    if schedule.startswith("dualpipe"):
        assert measured["pairs"] and any(isinstance(i, Overlap) for i, _, _ in sim.ranks[0].timeline)


def test_calibration_refuses_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(TraceError, match="no pipeline instructions"):
        measured_costs(bad, 2)
    bad.write_text("not json")
    with pytest.raises(TraceError, match="not a step trace"):
        measured_costs(bad, 2)


# -- prediction -------------------------------------------------------------------

V3 = ["model=deepseek_v3", "cluster=h800", "cluster.nodes=256", "parallel.pp=16", "parallel.ep=64", "parallel.tp=1",
      "parallel.schedule=dualpipe", "parallel.dispatcher=deepep", "parallel.num_microbatches=null",
      "train.dtype=bf16", "train.fp8=blockwise", "data.seq_len=4096", "train.global_batch_size=15360",
      "train.micro_batch_size=1", "train.zero1=true", "model.recompute=selective"]


def test_prediction_arithmetic_and_the_deepseek_v3_point():
    cfg = _cfg(*V3)
    p = predict(cfg)
    assert not p["errors"]
    assert p["step_s"] == pytest.approx(p["pipeline_s"] + p["grad_sync_s"] + p["optimizer_s"])
    assert p["tokens_per_s_per_gpu"] * p["step_s"] * 2048 == pytest.approx(15360 * 4096)
    assert p["mfu"] == pytest.approx(flops_per_token(cfg.model, 4096) * p["tokens_per_s_per_gpu"] / 989e12)
    # Published: 2.664M GPU-hours for 14.8T tokens, about 180K per trillion. The
    # roofline model lands within 25 % of it (docs/planning.md has the figure).
    assert 0.75 < p["gpu_hours_per_trillion_tokens"] / 180e3 < 1.25
    # Node-limited routing: at most 4 nodes per token, 3 of them other than the sender's on average or more.
    assert 3.0 < p["traffic"]["remote_nodes_per_token"] < 4.0
    faster = predict(_cfg(*V3, "cluster.efficiency.fp8_gemm=0.9"))
    assert faster["step_s"] < p["step_s"]
    no_fp8 = predict(_cfg(*V3, "train.fp8=none", "parallel.dispatcher=alltoall"))
    assert no_fp8["step_s"] > p["step_s"]


def test_missing_profile_is_named():
    with pytest.raises(ProfileError, match=r"cluster.gpu.bf16_tflops.*cluster=h800"):
        hardware(_cfg().cluster)


# -- search ---------------------------------------------------------------------

def test_search_proposes_only_layouts_the_plan_accepts_and_that_fit():
    cfg = _cfg("model=deepseek_v2_lite", "cluster=h100", "cluster.nodes=2", "train.dtype=bf16",
               "parallel.dispatcher=alltoall", "train.global_batch_size=256", "train.micro_batch_size=1",
               "data.seq_len=2048", "plan.tp=[1,2]", "plan.pp=[1,2,4]", "plan.ep=[1,8,16]",
               "plan.recompute=[none,full]", "plan.fp8=[none]")
    result = search(cfg)
    ranked = result["ranked"]
    assert ranked and result["considered"] == len(ranked) + result["refused"] + result["too_big"]
    speeds = [r["tokens_per_s_per_gpu"] for r in ranked]
    assert speeds == sorted(speeds, reverse=True)
    for r in ranked:
        lay = r["layout"]
        again = _cfg("model=deepseek_v2_lite", "cluster=h100", "cluster.nodes=2", "train.dtype=bf16",
                     "parallel.dispatcher=alltoall", "train.global_batch_size=256", "train.micro_batch_size=1",
                     "data.seq_len=2048", f"parallel.tp={lay['tp']}", f"parallel.pp={lay['pp']}",
                     f"parallel.ep={lay['ep']}", f"parallel.schedule={lay['schedule']}",
                     "parallel.num_microbatches=null", f"model.recompute={lay['recompute']}",
                     *([f"parallel.pipeline_layout={lay['pipeline_layout']}"] if lay["pipeline_layout"] else []))
        plan = make_plan(again)
        assert not plan["errors"], (lay, plan["errors"])
        assert all(m["total"] <= hardware(again.cluster).hbm_bytes for m in plan["memory"])
        assert predict(again, plan=plan)["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s_per_gpu"], rel=1e-9)
    layouts = {tuple(sorted((k, str(v)) for k, v in r["layout"].items())) for r in ranked}
    assert len(layouts) == len(ranked)
    combos = set(itertools.product([1, 2], [1, 2, 4], [1, 8, 16]))
    assert {(r["layout"]["tp"], r["layout"]["pp"], r["layout"]["ep"]) for r in ranked} <= combos



def test_memory_counts_the_fp8_weight_copy_of_the_built_model():
    """Under FP8 the plan lists one FP8 copy (1 + 4/128² bytes per parameter)
    of every weight whose GEMM runs FP8, counted here from the built model's
    own FP8 flags; its activations shrink (tests/unit/test_fp8_saved.py
    checks the per-block figures against what autograd keeps)."""
    from mtrain.model.groups import ModelGroups
    from mtrain.model.model import ModelChunk
    from mtrain.model.moe.experts import GroupedExperts
    from mtrain.model.stats import FP8_WEIGHT_BYTES_PER_PARAM
    from mtrain.model.tp import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear

    base = ["parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=1",
            "cluster.gpus_per_node=1", "train.dtype=bf16", "model.hidden_size=128", "model.num_heads=2",
            "model.q_lora_rank=128", "model.kv_lora_rank=128", "model.ffn_hidden_size=256",
            "model.moe_ffn_hidden_size=128", "model.v_head_dim=64", "data.seq_len=64", "train.micro_batch_size=2"]
    plain = make_plan(_cfg(*base))
    fp8 = make_plan(_cfg(*base, "train.fp8=blockwise"))
    assert not plain["errors"] and not fp8["errors"], fp8["errors"]
    m = _cfg(*base).model
    model = ModelChunk(m, list(range(m.num_layers)), groups=ModelGroups(fp8=True))
    kinds = (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, GroupedExperts)
    fp8_params = sum(p.numel() for mod in model.modules() if isinstance(mod, kinds) and mod.fp8
                     for p in mod.parameters(recurse=False))
    # The estimate counts MLA's latent norm weights in (q_lora_rank + kv_lora_rank per block).
    latent_norms = (m.num_layers + m.mtp_depth) * (m.q_lora_rank + m.kv_lora_rank)
    assert fp8["memory"][0]["fp8_weights"] == round(FP8_WEIGHT_BYTES_PER_PARAM * (fp8_params + latent_norms))
    assert plain["memory"][0]["fp8_weights"] == 0
    assert fp8["memory"][0]["activations"] < 0.75 * plain["memory"][0]["activations"]


def _stage_seconds(cfg, layout):
    """Each stage's predicted F + B for ``layout``, from op_costs of the whole stage."""
    from mtrain.planner.balance import with_layout
    from mtrain.planner.predict import estimated_costs

    c = with_layout(cfg, layout)
    return [x["F"] + x["B"] for x in estimated_costs(c, make_plan(c), hardware(c.cluster))]


def _compositions(total, parts):
    if parts == 1:
        yield [total]
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield [first] + rest


@pytest.mark.parametrize("schedule,pp", [("1f1b", 2), ("1f1b", 4), ("dualpipev", 2)])
def test_balanced_layout_is_the_best_split(schedule, pp):
    """Against every split of the layers (zero-layer stages included), none has
    a slower slowest stage; the stage costs are the whole stages' own."""
    from mtrain.planner.balance import balanced_layout
    from mtrain.pipeline.schedule_rules import num_model_stages

    cfg = _cfg("model=deepseek_v2_lite", "cluster=h100", "cluster.nodes=2", "train.dtype=bf16",
               "parallel.dispatcher=alltoall", f"parallel.pp={pp}", f"parallel.schedule={schedule}", "parallel.ep=4",
               "parallel.num_microbatches=8", "train.micro_batch_size=1", "data.seq_len=2048", "model.num_layers=7")
    stages = num_model_stages(schedule, pp)
    best = balanced_layout(cfg)
    assert len(best) == stages and sum(best) == cfg.model.num_layers
    slowest = max(_stage_seconds(cfg, best))
    others = [max(_stage_seconds(cfg, c)) for c in _compositions(cfg.model.num_layers, stages)]
    assert slowest == pytest.approx(min(others), rel=1e-12)
    even = max(_stage_seconds(cfg, [len(s["layers"]) for s in make_plan(cfg)["stages"]]))
    assert slowest <= even


def test_balancing_unloads_deepseek_v3s_last_stage():
    """V3 on 16 stages: the head and MTP stage gets fewer layers, the bubble and
    the step shrink, and mtrain-plan prints the layout to use."""
    from mtrain.planner.balance import balanced_prediction
    from mtrain.cli.planning import format_balanced

    cfg = _cfg("model=deepseek_v3", "cluster=h800", "cluster.nodes=256", "parallel.pp=16", "parallel.ep=64",
               "parallel.dispatcher=deepep", "parallel.num_microbatches=null", "train.dtype=bf16",
               "train.fp8=blockwise", "data.seq_len=4096", "train.global_batch_size=15360",
               "train.micro_batch_size=1", "train.zero1=true", "model.recompute=selective")
    even, balanced = predict(cfg), balanced_prediction(cfg)
    layout = balanced["layout"]["pipeline_layout"]
    assert sum(layout) == 61 and layout[-1] < 4
    assert balanced["bubble_ratio"] < even["bubble_ratio"] and balanced["step_s"] < even["step_s"]
    assert max(_stage_seconds(cfg, layout)) < max(c["F"] + c["B"] for c in even["stage_costs"])
    line = format_balanced(balanced, even)
    assert f"parallel.pipeline_layout={layout}" in line and "GPU-hours" in line


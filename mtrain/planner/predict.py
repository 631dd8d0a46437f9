"""The step a config will take on a cluster: op costs
(:mod:`mtrain.planner.costs`, or measured ones from a calibration) through
the schedule simulator, plus the data-parallel gradient exchange and the
optimizer, then throughput, MFU, GPU-hours per trillion tokens and whether
every rank's memory fits."""
from __future__ import annotations

from typing import Optional

from mtrain.config.schema import resolve_dtype
from mtrain.model.stats import ACTIVATION_BYTES, BYTES_PER_PARAM, rank_params
from mtrain.parallel.env import ep_nodes
from mtrain.pipeline.instructions import Overlap
from mtrain.pipeline.simulate import simulate
from mtrain.planner.costs import Setting, op_costs
from mtrain.planner.hardware import LINK_LATENCY_S, Hardware, hardware
from mtrain.planner.plan import make_plan

COST_KEYS = ("F", "B", "W", "F_comm", "B_comm")
OPTIMIZER_PASSES = 2  # AdamW reads and writes its states, master weights and gradients once each


def _spans_nodes(ranks: list[int], gpus_per_node: int) -> bool:
    return len({r // gpus_per_node for r in ranks}) > 1


def setting(cfg, hw: Hardware) -> Setting:
    """The per-GPU facts the op costs depend on."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    nodes = ep_nodes(p.ep, p.tp, hw.gpus_per_node, p.ep_ranks_per_node)
    hops = p.dispatch_hops or (2 if nodes > 1 else 1)
    deepep = str(p.dispatcher) == "deepep" and p.ep > 1
    return Setting(tokens=t.micro_batch_size * cfg.data.seq_len, seq_len=cfg.data.seq_len, tp=p.tp, ep=p.ep,
                   expert_tp=p.expert_tp, ep_per_node=p.ep // nodes, hops=hops, fp8=str(t.fp8) == "blockwise",
                   recompute=str(m.recompute), dtype_bytes=2 if resolve_dtype(t.dtype, p.backend) == "bf16" else 4,
                   exchange_sms=p.deepep_num_sms if deepep else 0)


def collective_seconds(nbytes: float, ranks: list[int], hw: Hardware, kind: str) -> float:
    """A ring reduce-scatter/all-gather (``(n-1)/n`` of the bytes cross each
    link) or all-reduce (twice that) over ``ranks``."""
    n = len(ranks)
    if n <= 1:
        return 0.0
    factor = {"reduce_scatter": 1, "all_gather": 1, "all_reduce": 2}[kind] * (n - 1) / n
    return factor * nbytes / hw.link_bw(_spans_nodes(ranks, hw.gpus_per_node)) + (n - 1) * LINK_LATENCY_S


def grad_sync_seconds(cfg, plan: dict, hw: Hardware) -> tuple[float, float]:
    """(gradient exchange, optimizer step) seconds of the busiest pipeline rank:
    ZeRO-1's reduce-scatter of gradients and all-gather of weights (or an
    all-reduce), over dp for the dense parameters and expert_dp for the experts."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = plan["dtype"]
    grad_bytes = ACTIVATION_BYTES[str(p.grad_reduce_dtype)]  # bytes per element of that dtype
    per_param = BYTES_PER_PARAM[dtype]
    dp_ranks, edp_ranks = plan["groups"]["dp"][0], plan["groups"]["expert_dp"][0]
    worst_sync = worst_opt = 0.0
    for entry in plan["pipeline_ranks"]:
        held = [plan["stages"][i] for i in entry["stages"]]
        dense, expert = rank_params(m, held, p.tp, p.ep, p.expert_tp)
        sync = 0.0
        for params, ranks in ((dense, dp_ranks), (expert, edp_ranks)):
            if t.zero1:
                sync += collective_seconds(params * grad_bytes, ranks, hw, "reduce_scatter")
                sync += collective_seconds(params * per_param["weights"], ranks, hw, "all_gather")
            else:
                sync += collective_seconds(params * grad_bytes, ranks, hw, "all_reduce")
        shards = (len(dp_ranks), len(edp_ranks)) if t.zero1 else (1, 1)
        touched = (dense / shards[0] + expert / shards[1]) * sum(per_param.values())
        worst_sync = max(worst_sync, sync)
        worst_opt = max(worst_opt, OPTIMIZER_PASSES * touched / hw.memory_bw)
    return worst_sync, worst_opt


def p2p_seconds(cfg, plan: dict, hw: Hardware, dtype_bytes: int) -> float:
    """One stage boundary's activation (or gradient) transfer."""
    nbytes = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.model.hidden_size * dtype_bytes
    pipe = plan["groups"]["pp"][0]
    return nbytes / hw.link_bw(_spans_nodes(pipe, hw.gpus_per_node)) + LINK_LATENCY_S


def estimated_costs(cfg, plan: dict, hw: Hardware) -> list[dict]:
    s = setting(cfg, hw)
    return [op_costs(cfg.model, s, stage, hw) for stage in plan["stages"]]


def busiest_rank_parts(sim, costs: list[dict]) -> dict:
    """Where the busiest rank's step goes: compute, exchange not hidden by an
    overlapped pair, and idle (waiting on other stages)."""
    busiest = max(sim.ranks, key=lambda r: r.busy)
    compute = exposed = 0.0
    for ins, start, end in busiest.timeline:
        if isinstance(ins, Overlap):
            f, b = costs[ins.forward.stage], costs[ins.backward.stage]
            inner = (f["F"] - f["F_comm"]) + (b[ins.backward.kind] - b["B_comm"])
        else:
            c = costs[ins.stage]
            inner = c[ins.kind] - (c["F_comm"] if ins.kind == "F" else c["B_comm"] if ins.kind in "BI" else 0.0)
        compute += inner
        exposed += (end - start) - inner
    return {"rank": busiest.rank, "compute": compute, "exchange": exposed, "idle": busiest.idle}


def bound(parts: dict, step: float) -> str:
    """What limits the step: the largest overhead when it takes over a sixth
    of the step, else compute."""
    overheads = {"all-to-all": parts["exchange"], "bubble": parts["idle"], "gradient sync": parts["grad_sync"]}
    name = max(overheads, key=overheads.get)
    return name if overheads[name] > step / 6 else "compute"


def predict(cfg, calibration: Optional[dict] = None, plan: Optional[dict] = None) -> dict:
    """The predicted step of ``cfg`` on its ``cluster`` profile (``errors``
    non-empty when the config or profile is unusable). ``calibration``
    (:func:`mtrain.planner.calibrate.measured_costs`) replaces the estimated
    op costs by measured ones."""
    hw = hardware(cfg.cluster)
    plan = plan or make_plan(cfg, hw.world_size)
    if plan["errors"]:
        return {"errors": plan["errors"]}
    s = setting(cfg, hw)
    estimated = estimated_costs(cfg, plan, hw)
    if calibration is None:
        stage_costs = [{k: c[k] for k in COST_KEYS} for c in estimated]
        pairs, latency = None, p2p_seconds(cfg, plan, hw, s.dtype_bytes)
    else:
        stage_costs, pairs, latency = calibration["stages"], calibration["pairs"], calibration["latency"]
    p = cfg.parallel
    sim = simulate(str(p.schedule), p.pp, plan["num_microbatches"], stage_costs=stage_costs,
                   latency=latency, pair_costs=pairs)
    sync, optimizer = grad_sync_seconds(cfg, plan, hw)
    step = sim.makespan + sync + optimizer
    world = plan["world_size"]
    tokens_per_gpu = plan["tokens_per_step"] / step / world
    achieved = plan["flops_per_token"] * tokens_per_gpu
    parts = busiest_rank_parts(sim, [dict(c, I=c["B"] - c["W"]) for c in stage_costs])
    parts["grad_sync"] = sync + optimizer
    memory = [{"pp_rank": r["pp_rank"], "bytes": r["total"], "fits": r["total"] <= hw.hbm_bytes}
              for r in plan["memory"]]
    return {
        "errors": [],
        "hardware": hw.name, "world_size": world, "nodes": hw.nodes,
        "layout": {"tp": p.tp, "pp": p.pp, "ep": p.ep, "expert_tp": p.expert_tp, "dp": plan["dp"],
                   "schedule": str(p.schedule), "num_microbatches": plan["num_microbatches"],
                   "recompute": str(cfg.model.recompute), "fp8": str(cfg.train.fp8),
                   "pipeline_layout": None if p.pipeline_layout is None else list(p.pipeline_layout)},
        "calibrated": calibration is not None,
        "step_s": step, "pipeline_s": sim.makespan, "grad_sync_s": sync, "optimizer_s": optimizer,
        "bubble_ratio": sim.bubble_ratio, "p2p_s": latency,
        "tokens_per_step": plan["tokens_per_step"],
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "tflops_per_gpu": achieved / 1e12,
        "mfu": achieved / hw.peak_bf16_flops,
        "gpu_hours_per_trillion_tokens": 1e12 / tokens_per_gpu / 3600,
        "busiest_rank": parts,
        "bound": bound(parts, step),
        "memory": memory, "hbm_bytes": hw.hbm_bytes, "fits": all(r["fits"] for r in memory),
        "stage_costs": [{k: c[k] for k in COST_KEYS} for c in stage_costs],
        "breakdown": [c["breakdown"] for c in estimated],
        "traffic": estimated[0]["traffic"],  # the same for every stage
        "simulation": sim,
    }


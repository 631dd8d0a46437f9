"""The plan of a run, by arithmetic on the config without starting processes:
resolved sizes, groups (DualPipe's mirrored ranks as ``stage_copy``), stage
placement, parameter counts, FLOPs and memory. ``mtrain-plan`` prints it."""
from __future__ import annotations

from functools import lru_cache

from mtrain.config.schema import resolve_dtype
from mtrain.config.validate import planned_world_size
from mtrain.data.batching import batch_schedule
from mtrain.model.partition import stage_layers, stage_roles
from mtrain.model.stats import flops_per_token, memory_estimate, param_counts
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.schedule_rules import (copy_groups, num_model_stages, param_copies, peak_inflight_microbatches,
                                            stages_of_rank)
from mtrain.train.preflight import config_errors

PLAN_GROUP_KINDS = ("tp", "pp", "dp", "ep", "expert_dp", "expert_tp", "mp", "embedding", "stage_copy")


def make_plan(cfg, world_size: int | None = None) -> dict:
    """A JSON-ready description of the run; ``errors`` lists every config problem."""
    world = planned_world_size(cfg) if world_size is None else world_size
    p = cfg.parallel
    plan = {
        "world_size": world,
        "tp": p.tp, "ep": p.ep, "expert_tp": p.expert_tp, "pp": p.pp, "dp": None,
        "expert_dp": None, "order": p.order, "schedule": str(p.schedule),
        "num_microbatches": p.num_microbatches, "groups": {}, "pipeline_ranks": [],
        "errors": config_errors(cfg, world),
    }
    if plan["errors"]:
        return plan
    layout = _layout(world, p.tp, p.ep, p.expert_tp, p.pp, p.order,
                     tuple(map(tuple, copy_groups(str(p.schedule), p.pp))))
    plan.update(dp=layout.dp, expert_dp=layout.expert_dp)
    plan["groups"] = {k: layout.groups[k] for k in PLAN_GROUP_KINDS if k in layout.groups}
    plan["num_stages"] = num_model_stages(p.schedule, p.pp)
    plan["param_copies"] = param_copies(p.schedule)
    plan["pipeline_ranks"] = [
        {"pp_rank": r, "stages": stages_of_rank(p.schedule, p.pp, r),
         "ranks": [pipe[r] for pipe in layout.groups["pp"]]}
        for r in range(p.pp)
    ]
    plan.update(batch_facts(cfg, layout.dp))
    plan.update(model_facts(cfg, world))
    return plan


@lru_cache(maxsize=32)
def _layout(world: int, tp: int, ep: int, expert_tp: int, pp: int, order: str, copies: tuple):
    """Layouts of thousands of ranks take a while to build; a search asks for the same ones often."""
    return build_layout(world, tp, ep, expert_tp, pp, order, [list(c) for c in copies])


def batch_facts(cfg, dp: int) -> dict:
    """The global batch (given or derived), micro-batches per data-parallel
    rank, and the batch-size ramp with the steps and samples it takes."""
    batch = batch_schedule(cfg.train, cfg.parallel, dp)
    facts = {"num_microbatches": batch.num_microbatches, "global_batch_size": batch.global_batch_size,
             "tokens_per_step": batch.global_batch_size * cfg.data.seq_len, "batch_ramp": None}
    if batch.ramp is not None:
        steps, samples = batch.ramp_steps()
        facts["batch_ramp"] = {"start_size": batch.ramp.start_size, "increment": batch.ramp.increment,
                               "ramp_samples": batch.ramp.ramp_samples, "sizes": len(batch.sizes()),
                               "steps": steps, "samples": samples}
    return facts


def model_facts(cfg, world_size: int) -> dict:
    """Parameter counts, FLOPs, the layers and pieces of every model stage with
    the pipeline ranks holding it, and the memory estimate of every pipeline rank
    (``dtype``: what ``train.dtype`` is taken as, ``auto`` as on GPUs unless
    ``parallel.backend=gloo``)."""
    m, p = cfg.model, cfg.parallel
    counts = param_counts(m)
    num_stages = num_model_stages(p.schedule, p.pp)
    layout = None if p.pipeline_layout is None else list(p.pipeline_layout)
    layers = stage_layers(m.num_layers, num_stages, layout)
    roles = stage_roles(num_stages, has_mtp=m.mtp_depth > 0)
    held = [stages_of_rank(p.schedule, p.pp, r) for r in range(p.pp)]
    stages = [
        {"stage": i, "layers": layers[i], **roles[i], "pp_ranks": [r for r in range(p.pp) if i in held[r]]}
        for i in range(num_stages)
    ]
    memory = []
    num_microbatches = batch_schedule(cfg.train, p, world_size // (p.tp * p.pp)).num_microbatches
    for r in range(p.pp):
        peak = peak_inflight_microbatches(p.schedule, p.pp, num_microbatches, r)
        estimate = memory_estimate(cfg, [stages[i] for i in held[r]], peak, world_size)
        memory.append({"pp_rank": r, "peak_inflight_microbatches": peak, **estimate})
    return {
        "model": m.name,
        "params_total": counts["total"],
        "params_activated": counts["activated"],
        "params_mtp": counts["mtp"],
        "params_breakdown": counts["breakdown"],
        "flops_per_token": flops_per_token(m, cfg.data.seq_len),
        "seq_len": cfg.data.seq_len,
        "dtype": resolve_dtype(cfg.train.dtype, p.backend),
        "stages": stages,
        "memory": memory,
    }

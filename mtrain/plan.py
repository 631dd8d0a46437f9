"""The plan of a run: resolved sizes, groups and stage placement, without
starting processes. Shared by ``mtrain-plan`` and the trainer's start-up log."""
from __future__ import annotations

from mtrain.config.validate import config_errors, planned_world_size
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.schedule_rules import num_model_stages, param_copies, stages_of_rank

PLAN_GROUP_KINDS = ("tp", "pp", "dp", "ep", "expert_dp", "expert_tp", "mp", "embedding", "dualpipe_pair")


def make_plan(cfg, world_size: int | None = None) -> dict:
    """A JSON-ready description of the run; ``errors`` lists every config problem."""
    world = planned_world_size(cfg) if world_size is None else world_size
    p = cfg.parallel
    plan = {
        "world_size": world,
        "tp": p.tp, "ep": p.ep, "expert_tp": p.expert_tp, "pp": p.pp, "dp": None,
        "expert_dp": None, "order": p.order, "schedule": p.schedule,
        "num_microbatches": p.num_microbatches, "groups": {}, "pipeline_ranks": [],
        "errors": config_errors(cfg, world),
    }
    if plan["errors"]:
        return plan
    layout = build_layout(world, p.tp, p.ep, p.expert_tp, p.pp, p.order, p.schedule)
    plan.update(dp=layout.dp, expert_dp=layout.expert_dp)
    plan["groups"] = {k: layout.groups[k] for k in PLAN_GROUP_KINDS if k in layout.groups}
    plan["num_stages"] = num_model_stages(p.schedule, p.pp)
    plan["param_copies"] = param_copies(p.schedule)
    plan["pipeline_ranks"] = [
        {"pp_rank": r, "stages": stages_of_rank(p.schedule, p.pp, r),
         "ranks": [pipe[r] for pipe in layout.groups["pp"]]}
        for r in range(p.pp)
    ]
    plan["global_batch_size"] = cfg.train.micro_batch_size * p.num_microbatches * layout.dp
    plan["tokens_per_step"] = plan["global_batch_size"] * cfg.data.seq_len
    return plan


def _fmt_groups(groups: list[list[int]], limit: int = 8) -> str:
    shown = ", ".join(str(g) for g in groups[:limit])
    return shown + (f", ... ({len(groups)} groups)" if len(groups) > limit else "")


def format_plan(plan: dict) -> str:
    if plan["errors"]:
        return "invalid config:\n" + "\n".join(f"  - {e}" for e in plan["errors"])
    lines = [
        f"world size {plan['world_size']}: tp={plan['tp']} pp={plan['pp']} dp={plan['dp']} | "
        f"experts: ep={plan['ep']} expert_tp={plan['expert_tp']} expert_dp={plan['expert_dp']} "
        f"(order {plan['order']})",
        f"schedule {plan['schedule']}: {plan['num_microbatches']} micro-batches, "
        f"{plan['num_stages']} model stages, {plan['param_copies']} copy(ies) of each stage",
        f"global batch {plan['global_batch_size']} sequences = {plan['tokens_per_step']} tokens per step",
        "groups:",
    ]
    lines += [f"  {kind:<14} {_fmt_groups(groups)}" for kind, groups in plan["groups"].items()]
    lines.append("pipeline:")
    for entry in plan["pipeline_ranks"]:
        lines.append(
            f"  pp rank {entry['pp_rank']}: stages {entry['stages']} on ranks {_fmt_groups([entry['ranks']])}"
        )
    for key in ("model", "stages", "memory"):
        if key in plan:
            lines.append(f"{key}: {plan[key]}")
    return "\n".join(lines)

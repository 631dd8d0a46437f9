"""The plan of a run for ``mtrain-plan``: resolved sizes, groups (DualPipe's
mirrored ranks as ``stage_copy``), stage placement, parameter counts, FLOPs and
memory, without starting processes."""
from __future__ import annotations

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
    layout = build_layout(world, p.tp, p.ep, p.expert_tp, p.pp, p.order, copy_groups(p.schedule, p.pp))
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


def _fmt_ranks(ranks: list[int], limit: int = 16) -> str:
    if len(ranks) <= limit:
        return str(ranks)
    return f"[{', '.join(map(str, ranks[:limit // 2]))}, ..., {ranks[-1]}] ({len(ranks)} ranks)"


def _fmt_groups(groups: list[list[int]], limit: int = 8) -> str:
    shown = ", ".join(_fmt_ranks(g) for g in groups[:limit])
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
        *_format_ramp(plan["batch_ramp"], plan["global_batch_size"]),
        "groups:",
    ]
    lines += [f"  {kind:<14} {_fmt_groups(groups)}" for kind, groups in plan["groups"].items()]
    lines.append("pipeline:")
    for entry in plan["pipeline_ranks"]:
        lines.append(
            f"  pp rank {entry['pp_rank']}: stages {entry['stages']} on ranks {_fmt_groups([entry['ranks']])}"
        )
    lines += _format_model(plan)
    return "\n".join(lines)


def _format_ramp(ramp, global_batch: int) -> list[str]:
    if ramp is None:
        return []
    return [f"batch ramp: {ramp['start_size']} -> {global_batch} sequences by {ramp['increment']} over the first "
            f"{ramp['ramp_samples']} samples ({ramp['sizes']} sizes; full batch from step {ramp['steps'] + 1}, "
            f"after {ramp['samples']} samples)"]


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def _flops(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}FLOP"
    return f"{n:.3g} FLOP"


def _bytes(n: float) -> str:
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 2**shift:
            return f"{n / 2**shift:.2f} {unit}"
    return f"{int(n)} B"


def _layer_range(layers: list[int]) -> str:
    if not layers:
        return "no layers"
    return f"layers {layers[0]}-{layers[-1]} ({len(layers)})"


def _format_model(plan: dict) -> list[str]:
    lines = [
        f"model {plan['model']}: {_count(plan['params_total'])} total, "
        f"{_count(plan['params_activated'])} activated, MTP {_count(plan['params_mtp'])}; "
        f"{_flops(plan['flops_per_token'])} per token for training at seq_len {plan['seq_len']}",
        "stages:",
    ]
    for s in plan["stages"]:
        extras = [name for name in ("embedding", "head", "mtp") if s[name]]
        lines.append(
            f"  stage {s['stage']}: {_layer_range(s['layers'])}"
            + (f" + {' + '.join(extras)}" if extras else "")
            + f" on pp ranks {s['pp_ranks']}"
        )
    lines.append(f"memory per rank (estimate, {plan['dtype']} training):")
    for r in plan["memory"]:
        lines.append(
            f"  pp rank {r['pp_rank']}: {_count(r['params'])} params; weights {_bytes(r['weights'])} + "
            f"grads {_bytes(r['grads'])} + optimizer {_bytes(r['optimizer'])} + activations "
            f"{_bytes(r['activations'])} ({r['peak_inflight_microbatches']} micro-batches in flight) "
            f"= {_bytes(r['total'])}"
        )
    return lines

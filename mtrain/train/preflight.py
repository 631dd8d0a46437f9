"""The complete config check, run before anything is built.

``config_errors`` returns *every* problem at once: the rules on the config's
own fields (:mod:`mtrain.config.validate`) plus those that need the rank
layout, the pipeline schedules and the learning-rate schedule. It lives on the
train layer because that is the lowest one that may import all of them.
Nothing here creates a process group or a tensor.
"""
from __future__ import annotations

from pathlib import Path

from mtrain.config.schema import Schedule, resolve_dtype
from mtrain.config.validate import ConfigError, field_errors, planned_world_size
from mtrain.data.batching import batch_errors, batch_schedule
from mtrain.data.blend import blend_errors
from mtrain.data.split import PARTS, parse_split, split_errors
from mtrain.model.moe.deepep import config_errors as deepep_config_errors
from mtrain.parallel.groups import default_backend, timeout_errors
from mtrain.parallel.layout import LayoutError, layout_errors, parse_order
from mtrain.pipeline.schedule_rules import microbatch_rule, num_model_stages, schedule_errors
from mtrain.train.lr import lr_schedule_errors

__all__ = ["ConfigError", "check_config", "config_errors"]


def _stage_errors(m, p) -> list[str]:
    """``parallel.pipeline_layout`` (or the layer count) against the model stages."""
    stages = num_model_stages(p.schedule, p.pp)
    if p.pipeline_layout is not None:
        layout = list(p.pipeline_layout)
        if len(layout) != stages:
            return [
                f"parallel.pipeline_layout has {len(layout)} entries but parallel.schedule={p.schedule} "
                f"with parallel.pp={p.pp} cuts the model into {stages} stages: give one layer count per stage"
            ]
        if any(n < 0 for n in layout) or sum(layout) != m.num_layers:
            return [
                f"parallel.pipeline_layout={layout} must be non-negative layer counts summing to "
                f"model.num_layers={m.num_layers} (they sum to {sum(layout)})"
            ]
        return []
    if m.num_layers < stages:
        return [
            f"model.num_layers={m.num_layers} cannot be split over {stages} pipeline stages "
            f"(parallel.schedule={p.schedule}, parallel.pp={p.pp}): lower pp or add layers"
        ]
    return []


def _batch_errors(cfg, world: int) -> list[str]:
    """The global batch and its ramp against the layout and the schedule's
    rules on micro-batch counts: every size on the ramp is checked."""
    p, t = cfg.parallel, cfg.train
    derived = t.global_batch_size is not None
    # An explicit count is checked as written (today's messages); a derived one below.
    errors = schedule_errors(p.schedule, p.pp, None if derived else (1 if p.num_microbatches is None
                                                                      else p.num_microbatches))
    if p.tp < 1 or p.pp < 1 or world % (p.tp * p.pp) or p.schedule not in Schedule.values():
        return errors  # the layout or the schedule is reported already
    dp = world // (p.tp * p.pp)
    own = batch_errors(t, p, dp)
    if own or not derived:
        return errors + own
    schedule = batch_schedule(t, p, dp)
    multiple, minimum = microbatch_rule(p.schedule, p.pp)
    bad = [size for size in schedule.sizes()
           if (size // schedule.round_size) % multiple or size // schedule.round_size < minimum]
    if not bad:
        return errors
    round_size = schedule.round_size
    need = (f"parallel.schedule={p.schedule} with parallel.pp={p.pp} needs "
            + (f"an even number of micro-batches per data-parallel rank, at least {minimum}" if multiple == 2
               else f"at least {minimum} micro-batches per data-parallel rank"))
    fix = (f"global batches that are multiples of {round_size * multiple} and at least {round_size * minimum} "
           f"(train.micro_batch_size x dp = {t.micro_batch_size} x {dp} = {round_size} sequences per micro-batch "
           f"round)")
    if bad == [schedule.global_batch_size]:
        return errors + [f"train.global_batch_size={bad[0]} gives {bad[0] // round_size} micro-batches per "
                         f"data-parallel rank ({bad[0]} / ({t.micro_batch_size} x dp={dp})), but {need}: use {fix}"]
    shown = ", ".join(f"{s} ({s // round_size})" for s in bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
    return errors + [f"train.batch_ramp gives global batches whose micro-batch counts per data-parallel rank "
                     f"the schedule refuses: {shown}; {need}: make train.batch_ramp.start_size and "
                     f"train.batch_ramp.increment multiples of {round_size * multiple} with start_size at least "
                     f"{round_size * minimum} (train.micro_batch_size x dp = {t.micro_batch_size} x {dp} = "
                     f"{round_size} sequences per micro-batch round)"]


def config_errors(cfg, world_size: int | None = None) -> list[str]:
    """Every problem of ``cfg`` (a Config dataclass or DictConfig), each rule once.

    ``world_size`` defaults to ``cluster.nodes * cluster.gpus_per_node``; a
    launched job passes the real one.
    """
    p = cfg.parallel
    world = planned_world_size(cfg) if world_size is None else world_size
    errors = []
    try:
        parse_order(p.order)
    except LayoutError as e:
        errors.append(str(e))
    errors += layout_errors(world, p.tp, p.ep, p.expert_tp, p.pp)
    errors += _batch_errors(cfg, world)
    # The stage count needs a known schedule and pp >= 1 (reported just above otherwise).
    if p.schedule in Schedule.values() and p.pp >= 1:
        errors += _stage_errors(cfg.model, p)
    errors += field_errors(cfg, world)
    errors += lr_schedule_errors(cfg.train)
    errors += timeout_errors(cfg.train)
    errors += blend_errors(cfg.data)
    errors += _split_errors(cfg.eval)
    errors += _dispatcher_errors(cfg, planned=world_size is None)
    if world_size is not None:  # a launched run: the files it names must be there (a plan needs none)
        errors += _path_errors(cfg)
    return errors


def _path_errors(cfg) -> list[str]:
    """Paths the run will open, checked before any rank builds anything."""
    errors = []
    for key, prefix in (("data.path", cfg.data.path), ("eval.path", cfg.eval.path)):
        if prefix is not None:
            missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not Path(p).is_file()]
            if missing:
                errors.append(f"{key}={prefix}: {' and '.join(missing)} not found; give the prefix of a dataset "
                              f"made by tools/preprocess_data.py")
    resume = str(cfg.checkpoint.resume)
    if resume not in ("latest", "none") and not Path(resume).exists():
        errors.append(f"checkpoint.resume={resume}: no such checkpoint; use latest, none, or the path of a "
                      f"step_N checkpoint directory")
    init_from = cfg.checkpoint.init_from
    if init_from is not None and not Path(str(init_from)).exists():
        errors.append(f"checkpoint.init_from={init_from}: no such directory (a Hugging Face checkpoint or an "
                      f"mtrain checkpoint)")
    return errors


def _dispatcher_errors(cfg, planned: bool) -> list[str]:
    """DeepEP's limits, against the dtype the run will train in (a planned run
    is taken to be on GPUs; a launched one on the backend it will get)."""
    p = cfg.parallel
    if str(p.dispatcher) != "deepep":
        return []
    backend = str(p.backend) if str(p.backend) != "auto" else ("nccl" if planned else default_backend())
    return deepep_config_errors(p.ep, resolve_dtype(cfg.train.dtype, backend))


def check_config(cfg, world_size: int | None = None) -> None:
    """Raise :class:`ConfigError` with every problem of ``cfg``, if any."""
    errors = config_errors(cfg, world_size)
    if errors:
        raise ConfigError(errors)


def _split_errors(e) -> list[str]:
    """``eval.split``'s format, and a valid part to evaluate when evaluation uses it."""
    errors = split_errors(e.split)
    if not errors and e.split is not None and e.path is None and e.interval \
            and parse_split(e.split)[PARTS.index("valid")] == 0:
        errors.append(f"eval.split={e.split!r} holds no documents out for validation (its second share is 0) "
                      f"but eval.interval={e.interval} evaluates: give the valid part a share, or set eval.path")
    return errors

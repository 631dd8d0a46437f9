"""The complete config check, run before anything is built.

``config_errors`` returns *every* problem at once: the rules on the config's
own fields (:mod:`mtrain.config.validate`) plus those that need the rank
layout, the pipeline schedules and the learning-rate schedule. It lives on the
train layer because that is the lowest one that may import all of them.
Nothing here creates a process group or a tensor.
"""
from __future__ import annotations

from mtrain.config.schema import Schedule
from mtrain.config.validate import ConfigError, field_errors, planned_world_size
from mtrain.parallel.layout import LayoutError, layout_errors, parse_order
from mtrain.pipeline.schedule_rules import num_model_stages, schedule_errors
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
    errors += schedule_errors(p.schedule, p.pp, p.num_microbatches)
    # The stage count needs a known schedule and pp >= 1 (reported just above otherwise).
    if p.schedule in Schedule.values() and p.pp >= 1:
        errors += _stage_errors(cfg.model, p)
    errors += field_errors(cfg, world)
    errors += lr_schedule_errors(cfg.train)
    return errors


def check_config(cfg, world_size: int | None = None) -> None:
    """Raise :class:`ConfigError` with every problem of ``cfg``, if any."""
    errors = config_errors(cfg, world_size)
    if errors:
        raise ConfigError(errors)

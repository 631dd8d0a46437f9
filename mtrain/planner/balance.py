"""A pipeline layout balanced by predicted cost.

The default split gives every model stage as many decoder layers (give or
take one), so the stages that also hold the embedding and, above all, the
output head and the MTP modules take longer, and in every schedule the other
stages wait on them (DeepSeek-V3 on 16 stages: the last is 1.5x the others).
:func:`balanced_layout` moves layers off them: it picks the layer counts per
stage (consecutive layers, zero allowed, as ``parallel.pipeline_layout``
takes them) that minimise the largest stage's predicted forward + backward
time, exactly, by dynamic programming over the split points. A stage's time
is the sum of its layers' and its embedding/head/MTP's
(:func:`mtrain.planner.costs.op_costs` is additive over them).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from mtrain.model.partition import stage_layers, stage_roles
from mtrain.pipeline.schedule_rules import num_model_stages
from mtrain.planner.costs import op_costs
from mtrain.planner.hardware import Hardware, hardware
from mtrain.planner.plan import make_plan
from mtrain.planner.predict import predict, setting


def _seconds(cfg, hw: Hardware, s, layers: list[int], role: dict) -> float:
    c = op_costs(cfg.model, s, {"layers": layers, **role}, hw)
    return c["F"] + c["B"]


def balanced_layout(cfg, hw: Optional[Hardware] = None) -> list[int]:
    """Layer counts per model stage minimising the slowest stage's predicted
    forward + backward time on ``cfg.cluster`` (ties: the earliest split)."""
    hw = hw or hardware(cfg.cluster)
    m, s = cfg.model, setting(cfg, hw)
    stages = num_model_stages(str(cfg.parallel.schedule), cfg.parallel.pp)
    roles = stage_roles(stages, has_mtp=m.mtp_depth > 0)
    bare = {"embedding": False, "head": False, "mtp": False}
    extra = [_seconds(cfg, hw, s, [], role) for role in roles]
    prefix = [0.0]
    for layer in range(m.num_layers):
        prefix.append(prefix[-1] + _seconds(cfg, hw, s, [layer], bare))
    n = m.num_layers
    # slowest[s][i]: the least possible slowest-stage time of stages 0..s-1 holding layers 0..i-1.
    inf = float("inf")
    slowest = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    slowest[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(n + 1):
            for j in range(i + 1):
                t = max(slowest[s - 1][j], extra[s - 1] + prefix[i] - prefix[j])
                if t < slowest[s][i]:
                    slowest[s][i], cut[s][i] = t, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    return counts[::-1]


def with_layout(cfg, layout: list[int]):
    """``cfg`` (a DictConfig or its dataclasses) with ``parallel.pipeline_layout`` set."""
    base = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    return dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, pipeline_layout=list(layout)))


def balanced_prediction(cfg, hw: Optional[Hardware] = None) -> Optional[dict]:
    """The prediction of ``cfg`` with :func:`balanced_layout` (in its
    ``layout["pipeline_layout"]``), or None when that is the layout ``cfg``
    already runs (one stage, or the same counts)."""
    hw = hw or hardware(cfg.cluster)
    if cfg.parallel.pp == 1:
        return None
    layout = balanced_layout(cfg, hw)
    stages = num_model_stages(str(cfg.parallel.schedule), cfg.parallel.pp)
    current = stage_layers(cfg.model.num_layers, stages, cfg.parallel.pipeline_layout)
    if [len(layers) for layers in current] == layout:
        return None
    balanced = with_layout(cfg, layout)
    plan = make_plan(balanced, hw.world_size)
    if plan["errors"]:
        return None
    return predict(balanced, plan=plan)

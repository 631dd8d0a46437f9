"""Which layout to run: every combination of tp, pp, ep, schedule, recompute
and FP8 (``plan.*`` narrows each) that the config checks accept and whose
memory estimate fits every rank, ranked by predicted tokens/s per GPU.

Cheap filters first (the config checks, then the memory estimate without the
rank groups), so only layouts that can run are simulated. The global batch
(``train.global_batch_size``, else ``num_microbatches x micro_batch_size x
dp`` of the given config) stays fixed, so the micro-batch count follows dp.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Callable, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from mtrain.planner.balance import balanced_prediction
from mtrain.planner.hardware import hardware
from mtrain.planner.plan import make_plan, model_facts
from mtrain.planner.predict import predict
from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES
from mtrain.train.preflight import config_errors

RECOMPUTE = ("none", "selective", "full")
FP8 = ("none", "blockwise")


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def search_space(cfg, world: int) -> dict[str, list]:
    """Candidate values per knob: ``plan.<knob>`` when given, else what can fit."""
    m, space = cfg.model, cfg.plan

    def pick(name: str, default: Iterable) -> list:
        given = getattr(space, name)
        return [str(v) if isinstance(v, str) else v for v in given] if given is not None else list(default)

    return {
        "tp": pick("tp", [t for t in _powers_of_two(cfg.cluster.gpus_per_node) if m.num_heads % t == 0]),
        "pp": pick("pp", [p for p in _powers_of_two(min(world, m.num_layers)) if world % p == 0]),
        "ep": pick("ep", _divisors(m.num_routed_experts, world) if m.first_k_dense < m.num_layers else [1]),
        "schedule": pick("schedules", SCHEDULE_NAMES),
        "recompute": pick("recompute", RECOMPUTE),
        "fp8": pick("fp8", FP8),
    }


def _global_batch(cfg, world: int) -> int:
    t, p = cfg.train, cfg.parallel
    if t.global_batch_size is not None:
        return t.global_batch_size
    if p.num_microbatches is None:
        raise ValueError("a layout search keeps the global batch fixed: set train.global_batch_size (sequences "
                         "per step) or parallel.num_microbatches")
    return p.num_microbatches * t.micro_batch_size * world // (p.tp * p.pp)


def candidates(cfg, world: int) -> Iterable:
    """Configs of every combination in :func:`search_space`, the global batch
    fixed (plain dataclasses: the arithmetic reads their fields many times)."""
    base = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    space = search_space(base, world)
    batch = _global_batch(base, world)
    for tp, pp, ep, schedule, recompute, fp8 in itertools.product(*space.values()):
        if pp == 1 and schedule != space["schedule"][0]:
            continue  # one stage: every schedule is the same
        yield dataclasses.replace(
            base,
            parallel=dataclasses.replace(base.parallel, tp=tp, pp=pp, ep=ep, schedule=schedule, num_microbatches=None),
            model=dataclasses.replace(base.model, recompute=recompute),
            train=dataclasses.replace(base.train, fp8=fp8, global_batch_size=batch))


def fits(cfg, world: int, hbm_bytes: float) -> bool:
    """Whether every pipeline rank's memory estimate fits, before building groups."""
    return all(r["total"] <= hbm_bytes for r in model_facts(cfg, world)["memory"])


def search(cfg, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Ranked predictions (best first) of every layout that fits, and how many
    were considered, refused by the config checks or too large. The best
    (twice ``plan.top``) are then tried with their stages balanced by cost
    (:func:`mtrain.planner.balance.balanced_prediction`, unless the config
    gives ``parallel.pipeline_layout``), kept so when that is faster and
    fits."""
    hw = hardware(cfg.cluster)
    world = hw.world_size
    all_candidates = list(candidates(cfg, world))
    feasible, rejected, too_big = [], 0, 0
    for i, c in enumerate(all_candidates):
        if progress:
            progress(i, len(all_candidates))
        if config_errors(c, world):
            rejected += 1
            continue
        if not fits(c, world, hw.hbm_bytes):
            too_big += 1
            continue
        result = predict(c, plan=make_plan(c, world))
        result.pop("simulation")
        feasible.append((c, result))
    speed = lambda pair: -pair[1]["tokens_per_s_per_gpu"]  # noqa: E731
    feasible.sort(key=speed)
    if cfg.parallel.pipeline_layout is None:
        for i, (c, result) in enumerate(feasible[:2 * cfg.plan.top]):
            balanced = balanced_prediction(c, hw)
            if balanced and balanced["fits"] and balanced["tokens_per_s_per_gpu"] > result["tokens_per_s_per_gpu"]:
                balanced.pop("simulation")
                feasible[i] = (c, balanced)
        feasible.sort(key=speed)
    return {"considered": len(all_candidates), "refused": rejected, "too_big": too_big,
            "ranked": [result for _, result in feasible], "hardware": hw.name, "world_size": world}


def stderr_progress(i: int, n: int) -> None:
    """A one-line counter on stderr while the search runs."""
    if i % 25 == 0 or i == n - 1:
        print(f"\rsearching layouts: {i + 1}/{n}", end="" if i < n - 1 else "\n", file=sys.stderr, flush=True)

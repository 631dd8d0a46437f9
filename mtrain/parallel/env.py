"""Where this process sits: rank, world size, local rank and master address,
read from torchrun's variables or from Slurm's."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,007],cpu1``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_env(environ: dict | None = None) -> DistEnv:
    """torchrun (RANK/WORLD_SIZE set) wins over Slurm (SLURM_PROCID set);
    with neither, a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        # One port per job so that jobs sharing a node do not collide.
        port = env.get("MASTER_PORT") or DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 10000
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(port),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", DEFAULT_PORT)), "single")


def ranks_per_node(environ: dict | None = None) -> int | None:
    """Processes per node of this launch: torchrun's LOCAL_WORLD_SIZE, or
    Slurm's tasks per node (``4`` or ``4(x2)``); None when neither says."""
    env = os.environ if environ is None else environ
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        match = re.match(r"\d+", env.get(key, ""))
        if match:
            return int(match.group())
    return None


def ep_nodes(ep: int, tp: int, per_node: int | None, ep_ranks_per_node: int | None = None) -> int:
    """How many nodes an EP group spans: its ranks are ``tp`` apart (Megatron's
    order), so a node holds ``per_node // tp`` of them (or
    ``ep_ranks_per_node`` when given); one node when unknown."""
    in_node = ep_ranks_per_node or (max(1, per_node // tp) if per_node else ep)
    in_node = min(in_node, ep)
    return ep // in_node if ep % in_node == 0 else 1

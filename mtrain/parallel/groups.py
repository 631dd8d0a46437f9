"""torch.distributed process groups created from the pure layout."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mtrain.parallel.env import DistEnv, detect_env
from mtrain.parallel.layout import Layout, ep_hop_groups


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def collective_device(group=None) -> torch.device:
    """Where a tensor taking part in a collective over ``group`` (default: the
    world) must live: NCCL takes only CUDA tensors (this rank's current
    device), gloo takes CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: float = 300.0, env: DistEnv | None = None) -> DistEnv:
    """Initialise the default process group from torchrun or Slurm variables."""
    env = env or detect_env()
    if backend == "auto":
        backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return env


@dataclass
class ParallelGroups:
    """This rank's process group of every kind, plus the layout they came from."""

    layout: Layout
    rank: int
    groups: dict = field(default_factory=dict)  # kind -> ProcessGroup holding this rank
    timeout: datetime.timedelta | None = None  # what the groups were created with
    backend: str | None = None
    hop_groups: dict = field(default_factory=dict)  # EP ranks per node -> (node group, rail group)

    def group(self, kind: str):
        return self.groups[kind]

    def ranks(self, kind: str) -> list[int]:
        return self.layout.group_of(kind, self.rank)

    def size(self, kind: str) -> int:
        return len(self.ranks(kind))

    def index(self, kind: str) -> int:
        """This rank's position inside its group of ``kind``."""
        return self.ranks(kind).index(self.rank)

    def ep_hops(self, ranks_per_node: int) -> tuple:
        """This rank's (node, rail) groups of the two-level expert dispatch
        (:func:`~mtrain.parallel.layout.ep_hop_groups`). Created on the first
        call for ``ranks_per_node``, which every rank must make (collective),
        then kept."""
        if ranks_per_node not in self.hop_groups:
            made = []
            for kinds in ep_hop_groups(self.layout.groups["ep"], ranks_per_node):
                mine, _ = dist.new_subgroups_by_enumeration(kinds, timeout=self.timeout, backend=self.backend)
                made.append(mine)
            self.hop_groups[ranks_per_node] = tuple(made)
        return self.hop_groups[ranks_per_node]


def create_groups(layout: Layout, timeout_s: float = 300.0, backend: str | None = None) -> ParallelGroups:
    """Create every group of the layout. Every rank must call this (collective)."""
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(
            f"the layout is for {layout.world_size} ranks but {dist.get_world_size()} were launched"
        )
    rank = dist.get_rank()
    timeout = datetime.timedelta(seconds=timeout_s)
    out = ParallelGroups(layout=layout, rank=rank, timeout=timeout, backend=backend)
    for kind in sorted(layout.groups):
        # Same kinds in the same order on every rank: new_group is collective.
        mine, _ = dist.new_subgroups_by_enumeration(layout.groups[kind], timeout=timeout, backend=backend)
        out.groups[kind] = mine
    return out

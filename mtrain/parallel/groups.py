"""torch.distributed process groups created from the pure layout, and their timeout."""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from mtrain.parallel.env import DistEnv, detect_env
from mtrain.parallel.layout import Layout, ep_hop_groups

log = logging.getLogger("mtrain")


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

    def process_groups(self) -> list:
        """Every process group holding this rank made here (each once)."""
        found = list(self.groups.values()) + [g for pair in self.hop_groups.values() for g in pair]
        return list({id(g): g for g in found if g is not None}.values())

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


# -- the timeout of every collective (train.collective_timeout_s) --------------
# null sizes it to the step: a stopped or frozen rank then costs the others
# about ten steps' wait, not the generous start-up timeout.
TIMEOUT_FACTOR = 10.0  # x the slowest recent step
TIMEOUT_RECENT = 20  # steps that count as recent
TIMEOUT_WARMUP = 3  # a launch's first steps compile and warm caches: not judged (as the watchdog's)
REPORT_MARGIN_S = 15.0  # past the watchdog's budget: its report (a poll, the store's answers) comes first


def step_sized_timeout(step_times: Sequence[float], floor_s: float,
                       watchdog_s: Optional[float] = None) -> Optional[float]:
    """The collective timeout for a launch whose steps took ``step_times``
    seconds (oldest first): None while only its warm-up steps are known, then
    max(``floor_s``, TIMEOUT_FACTOR x the slowest of the recent steps,
    ``watchdog_s`` + REPORT_MARGIN_S), rounded up to whole seconds."""
    judged = list(step_times[TIMEOUT_WARMUP:])[-TIMEOUT_RECENT:]
    if not judged:
        return None
    need = max(floor_s, TIMEOUT_FACTOR * max(judged))
    if watchdog_s:
        need = max(need, watchdog_s + REPORT_MARGIN_S)
    return float(math.ceil(need))


_P2P_TIMEOUT: Optional[datetime.timedelta] = None  # the collectives' timeout now, for host p2p waits


def p2p_timeout() -> Optional[datetime.timedelta]:
    """What a waiting point-to-point receive should give up after (None:
    the group's own): gloo's receives keep the timeout their group was
    created with, so the pipeline passes this one to ``Work.wait``."""
    return _P2P_TIMEOUT


def set_group_timeout(timeout_s: float, group=None) -> bool:
    """Give the collectives ``group`` (None: the default group) starts from now
    on ``timeout_s``, and the pipeline's host receives (:func:`p2p_timeout`);
    False when this torch cannot change it."""
    global _P2P_TIMEOUT
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        return False
    setter(datetime.timedelta(seconds=timeout_s), group)
    _P2P_TIMEOUT = datetime.timedelta(seconds=timeout_s)
    return True


def timeout_errors(train) -> list[str]:
    """The problems of ``train.collective_timeout_*`` (``train``: the train config)."""
    errors = []
    fixed = train.collective_timeout_s
    if fixed is not None and fixed <= 0:
        errors.append(f"train.collective_timeout_s={fixed} must be positive seconds, or null to size it to the step")
    for name in ("collective_timeout_floor_s", "collective_timeout_startup_s"):
        value = getattr(train, name)
        if value <= 0:
            errors.append(f"train.{name}={value} must be positive seconds")
    return errors


class CollectiveTimeout:
    """The timeout of the default group and every group in ``groups()``:
    ``fixed_s`` when set; otherwise ``startup_s`` while the run starts, loads
    and warms up, then :func:`step_sized_timeout` after every step, and
    ``startup_s`` again inside :meth:`long_operation` and after :meth:`end_of_run`."""

    def __init__(self, fixed_s: Optional[float], startup_s: float, floor_s: float,
                 groups: Callable[[], Iterable] = tuple):
        self.fixed_s, self.startup_s, self.floor_s, self.groups = fixed_s, startup_s, floor_s, groups
        self.current_s = fixed_s or startup_s  # what the groups have now
        self.sized_s: Optional[float] = None  # what the steps ask for (None: not known yet)
        self._times: list[float] = []
        self._long = 0  # depth of long operations under way
        self._done = False

    @classmethod
    def from_config(cls, train) -> "CollectiveTimeout":
        from mtrain.config.validate import ConfigError

        errors = timeout_errors(train)
        if errors:
            raise ConfigError(errors)
        return cls(train.collective_timeout_s, train.collective_timeout_startup_s, train.collective_timeout_floor_s)

    def step_done(self, seconds: float, watchdog_s: Optional[float] = None) -> None:
        """Record a step of ``seconds`` (with every collective of it) and size
        the timeout to the steps; ``watchdog_s``: the watchdog's budget now."""
        if self.fixed_s or self._done:
            return
        self._times.append(seconds)
        if len(self._times) > TIMEOUT_WARMUP + TIMEOUT_RECENT:
            del self._times[TIMEOUT_WARMUP]  # the oldest judged step leaves (the warm-up ones stay, unjudged)
        sized = step_sized_timeout(self._times, self.floor_s, watchdog_s)
        if sized is None:
            return
        if self.sized_s is None:
            log.info("collectives now time out after %.0f s: sized to the steps (train.collective_timeout_s=null; "
                     "%.0f s while checkpointing or evaluating)", sized, self.startup_s)
        self.sized_s = sized
        if not self._long:
            self._apply(sized)

    @contextlib.contextmanager
    def long_operation(self):
        """Run the body (a checkpoint, an evaluation: collectives some ranks
        reach much later than others) under the start-up timeout."""
        self._long += 1
        if self._long == 1 and self.sized_s is not None and not self._done:
            self._apply(self.startup_s)
        try:
            yield
        finally:
            self._long -= 1
            if self._long == 0 and self.sized_s is not None and not self._done:
                self._apply(self.sized_s)

    def end_of_run(self) -> None:
        """The start-up timeout for good: what follows the last step (the final
        checkpoint, the requeue's agreement) runs unsized."""
        if self.sized_s is not None and not self._done:
            self._apply(self.startup_s)
        self._done = True

    def _apply(self, seconds: float) -> None:
        # Every time, not only on a change: a group made since (the EP hop groups) is caught up.
        for group in [None, *self.groups()]:
            if not set_group_timeout(seconds, group):
                if self.current_s != seconds:
                    log.warning("this torch cannot change a process group's timeout: collectives keep %.0f s "
                                "(set train.collective_timeout_s to fix it)", self.current_s)
                self.fixed_s = self.current_s  # nothing more to size
                return
        self.current_s = seconds

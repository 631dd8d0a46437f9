"""Which checkpoint a run continues from, and what moves out of its way.

All ranks decide together through the checkpointer's collectives: rank 0
lists the directory and broadcasts the listing, and each candidate is
verified by all ranks at once (each checksums a share of its files), so every
rank reaches the same decision. :func:`plan_resume` only reads (an
evaluation plans too); :func:`apply_plan`, when a training run has loaded
the chosen checkpoint, refuses or makes the changes on disk, on rank 0, and
logs them on every rank. Nothing is ever deleted: a
checkpoint that must leave the way is set aside as
``<name>.<reason>-<UTC time>`` (see :func:`checkpoint_files.set_aside`).

- ``resume=latest``: the checkpoint ``latest`` names, else the other
  ``step_N`` newest first, the first that verifies. The ones that failed
  before it are set aside as ``.corrupt-<time>``.
- ``resume=<path>``: that checkpoint; if it does not verify the run is refused.
- Checkpoints exist but none verifies, or ``resume=none`` while checkpoints
  exist: :class:`ResumeRefused`, naming each and why, unless
  ``checkpoint.allow_fresh_start``; then they (and ``latest``) are set aside
  and the run starts at step 0.
- After resuming at step S, the checkpoints under the root newer than S are
  set aside as ``.superseded-<time>``: the run's saves never overwrite nor
  prune them, and ``latest`` names the checkpoint resumed from.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mtrain.train.checkpoint_errors import ResumeRefused
from mtrain.train.checkpoint_files import (CORRUPT, LATEST, SUPERSEDED, CorruptCheckpointError, latest_name,
                                           read_manifest, set_aside, step_dirs, step_of, update_latest)

log = logging.getLogger(__name__)

FLAG = "checkpoint.allow_fresh_start=true"


@dataclass
class ResumePlan:
    path: Optional[Path] = None  # the verified checkpoint to load; None: start at step 0
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # failed verification: set aside
    refusal: Optional[str] = None  # why starting at step 0 would lose checkpoints (allow_fresh_start sets them aside)


def _listing(root: Path) -> tuple[Optional[str], list[str]]:
    """What ``latest`` names, and the ``step_N`` directory names, oldest first."""
    return latest_name(root), [p.name for p in step_dirs(root)]


def plan_resume(checkpointer, resume: str) -> ResumePlan:
    """Choose what the run starts from; collective over all ranks, reads only.
    Raises :class:`ResumeRefused` when an explicit ``resume`` path does not verify."""
    root = checkpointer.root
    latest, names = checkpointer.on_rank0(lambda: _listing(root))
    if resume not in ("latest", "none"):
        try:
            checkpointer.verify(resume)
        except CorruptCheckpointError as e:
            raise ResumeRefused(f"checkpoint.resume={resume} does not verify: {e}. Choose another checkpoint, or "
                                f"checkpoint.resume=latest to continue from the newest one that verifies") from None
        return ResumePlan(Path(resume))
    if not names and latest is None:
        return ResumePlan()  # nothing to continue and nothing to overwrite
    if resume == "none":
        return ResumePlan(refusal=(
            f"checkpoint.resume=none, but {root} holds checkpoints ({', '.join(names) or 'only ' + LATEST}) that "
            f"this run's saves would prune and overwrite. Continue them (checkpoint.resume=latest), set "
            f"checkpoint.dir to another directory, or set {FLAG} to start at step 0 with them set aside as "
            f"<name>.{SUPERSEDED}-<time> (never deleted)"))
    first = [latest] if latest in names else []
    failed = []
    for name in first + [n for n in reversed(names) if n != latest]:
        try:
            checkpointer.verify(root / name)
            return ResumePlan(root / name, corrupt=failed)
        except CorruptCheckpointError as e:
            log.warning("checkpoint %s failed verification: %s", root / name, e)
            failed.append((root / name, str(e)))
    return ResumePlan(corrupt=failed, refusal=_refusal(root, latest, names, failed))


def _refusal(root: Path, latest: Optional[str], names: list[str], failed: list[tuple[Path, str]]) -> str:
    lines = [f"refusing to start over: none of the {len(names)} checkpoints under {root} verifies, and this run's "
             f"saves would prune and overwrite them:"]
    if latest is not None and latest not in names:
        lines.append(f"  {LATEST}: names {latest}, which does not exist")
    for path, why in failed:
        lines.append(f"  {path.name}{' (named in latest)' if path.name == latest else ''}: {why}")
    lines.append(f"Repair or restore one of them, point checkpoint.resume at a good checkpoint, or set {FLAG} to "
                 f"start at step 0 with them set aside as <name>.{CORRUPT}-<time> (never deleted).")
    return "\n".join(lines)


def apply_plan(checkpointer, plan: ResumePlan, step: int, allow_fresh_start: bool) -> list[Path]:
    """Make way for a training run on disk after its checkpoint loaded
    (``step``: the step resumed at, 0 for a fresh start); collective. Raises
    :class:`ResumeRefused` if starting over would lose checkpoints and
    ``allow_fresh_start`` is false. Returns the new paths of what was set
    aside; each move is logged on every rank."""
    if plan.refusal is not None and not allow_fresh_start:
        raise ResumeRefused(plan.refusal)
    root = checkpointer.root

    def move() -> list[tuple[str, str, str]]:
        moved = []
        for path, why in plan.corrupt:
            if path.is_dir():
                moved.append((path.name, set_aside(path, CORRUPT).name, f"it failed verification: {why}"))
        if plan.refusal is not None:
            why = f"{FLAG}: the run starts at step 0"
            moved += [(p.name, set_aside(p, SUPERSEDED).name, why) for p in step_dirs(root)]
            if (root / LATEST).is_file():
                moved.append((LATEST, set_aside(root / LATEST, SUPERSEDED).name, why))
        elif plan.path is not None:
            why = f"it is newer than {plan.path.name}, which this run resumed from at step {step}"
            moved += [(p.name, set_aside(p, SUPERSEDED).name, why) for p in step_dirs(root) if step_of(p) > step]
            if plan.path.parent == root and latest_name(root) != plan.path.name:
                update_latest(root, plan.path)
        return moved

    moved = checkpointer.on_rank0(move)
    for name, aside, why in moved:
        log.warning("checkpoint %s set aside as %s (never deleted): %s", root / name, aside, why)
    if moved and plan.path is not None:
        log.warning("resuming from %s", plan.path)
    if plan.path is not None:
        checkpointer.on_rank0(lambda: _warn_if_short_of_space(root, plan.path))
    return [root / aside for _, aside, _ in moved]


def _warn_if_short_of_space(root: Path, resumed: Path) -> None:
    """A disk that cannot hold another checkpoint is said now, not at the first save."""
    needed = sum(entry["size"] for entry in read_manifest(resumed)["files"].values())
    try:
        free = shutil.disk_usage(root if root.exists() else resumed).free
    except OSError:
        return
    if free < needed:
        log.warning("%s has %.1f GiB free, and the next checkpoint needs about %.1f GiB (the size of %s): "
                    "free space or set checkpoint.dir elsewhere before the first save", root, free / 2**30,
                    needed / 2**30, resumed.name)

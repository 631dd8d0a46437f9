"""The on-disk protocol of checkpoints: directories, the COMPLETE manifest,
the ``latest`` pointer, verification, publication and pruning.

A checkpoint is written into ``step_<N>.tmp/``, sealed with a ``COMPLETE``
manifest (every file with its size, small files with a SHA-256), renamed to
``step_<N>/`` and only then named in ``latest``. ``latest`` is the commit
point: a crash at any earlier moment leaves the previous checkpoint as the
one a resume picks. Nothing here touches torch.distributed; the caller runs
the rank-0-only steps on rank 0.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
DCP_METADATA = ".metadata"
TMP_SUFFIX = ".tmp"
# 2: components are Stateful (model, optimizer with its step; progress, data, lr, rng per rank).
FORMAT_VERSION = 2
# Files up to this size get a checksum in the manifest (DCP metadata, extras);
# bigger data files are checked by size only so verification stays cheap.
CHECKSUM_LIMIT = 1 << 20
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Test hook: called with the name of each point a save passes ("written",
# "sealed", "published"), so tests can kill a process exactly there.
fault_hook: Optional[Callable[[str], None]] = None


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or does not match its manifest."""


def reach(point: str) -> None:
    if fault_hook is not None:
        fault_hook(point)


def step_dir(root: Path | str, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def tmp_dir(root: Path | str, step: int) -> Path:
    return step_dir(root, step).with_name(step_dir(root, step).name + TMP_SUFFIX)


def step_of(path: Path | str) -> Optional[int]:
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name, flush it to disk, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def build_manifest(directory: Path, step: int, world_size: int) -> dict:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MARKER:
            continue
        entry = {"size": path.stat().st_size}
        if entry["size"] <= CHECKSUM_LIMIT:
            entry["sha256"] = _sha256(path)
        files[rel] = entry
    if DCP_METADATA not in files:
        raise CorruptCheckpointError(f"{directory}: no {DCP_METADATA} was written; the save did not finish")
    return {"format": FORMAT_VERSION, "step": step, "world_size": world_size,
            "created": time.time(), "files": files}


def seal(directory: Path, step: int, world_size: int) -> dict:
    """Write the COMPLETE manifest into a fully written directory."""
    manifest = build_manifest(directory, step, world_size)
    write_atomic(directory / MARKER, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def publish(tmp: Path, final: Path) -> None:
    """Rename a sealed temporary directory to its final name, moving aside a
    checkpoint of the same step saved earlier."""
    if final.exists():
        aside = final.with_name(final.name + ".replaced" + TMP_SUFFIX)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def update_latest(root: Path, final: Path) -> None:
    write_atomic(root / LATEST, final.name + "\n")


def read_manifest(path: Path | str) -> dict:
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CorruptCheckpointError(f"{path}: no {MARKER} marker; the save never finished")
    try:
        manifest = json.loads(marker.read_text())
        manifest["files"], manifest["step"], manifest["world_size"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{marker}: unreadable manifest ({e})") from e
    return manifest


def verify_checkpoint(path: Path | str) -> dict:
    """Check a checkpoint against its manifest; return the manifest.

    Raises :class:`CorruptCheckpointError` naming the first problem: a missing
    directory, marker or file, a size or checksum mismatch.
    """
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpointError(f"{path}: no such checkpoint directory")
    manifest = read_manifest(path)
    if DCP_METADATA not in manifest["files"]:
        raise CorruptCheckpointError(f"{path}: the manifest does not list {DCP_METADATA}")
    for rel, entry in sorted(manifest["files"].items()):
        file = path / rel
        if not file.is_file():
            raise CorruptCheckpointError(f"{file}: listed in the manifest but missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpointError(f"{file}: {size} bytes on disk, the manifest says {entry['size']} "
                                         f"(truncated or overwritten)")
        if "sha256" in entry and _sha256(file) != entry["sha256"]:
            raise CorruptCheckpointError(f"{file}: checksum differs from the manifest (corrupted)")
    return manifest


def step_dirs(root: Path | str) -> list[Path]:
    """Final-named checkpoint directories under ``root``, oldest step first
    (whether complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def _is_valid(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CorruptCheckpointError as e:
        log.warning("skipping checkpoint: %s", e)
        return False


def find_latest(root: Path | str) -> Optional[Path]:
    """The checkpoint to resume from: the one ``latest`` names if it verifies,
    else (with a warning) the newest one that verifies; None if there is none.
    ``*.tmp`` directories are never candidates."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if step_of(named) is not None and _is_valid(named):
            return named
        log.warning("%s names %s, which is not a complete checkpoint; falling back to the newest complete one",
                    pointer, named.name)
    for candidate in reversed(step_dirs(root)):
        if _is_valid(candidate):
            return candidate
    return None


def remove_stale_tmp(root: Path, keep: Optional[Path] = None) -> None:
    """Delete leftovers of interrupted saves (every ``*.tmp`` but ``keep``)."""
    for path in Path(root).glob("*" + TMP_SUFFIX):
        if path != keep and path.is_dir():
            log.warning("removing %s left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep_last: int, current: Path) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (by step),
    never ``current``. Incomplete final-named directories are left alone."""
    if keep_last <= 0:
        return []
    complete = [p for p in step_dirs(root) if (p / MARKER).is_file()]
    keep = set(complete[-keep_last:]) | {current}
    removed = []
    for path in complete:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def finalize(root: Path, step: int, world_size: int, keep_last: int) -> Path:
    """Seal, publish, point ``latest`` at, and prune around the checkpoint of
    ``step`` whose files are all in its temporary directory (rank 0 only)."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    seal(tmp, step, world_size)
    reach("sealed")
    publish(tmp, final)
    reach("published")
    update_latest(Path(root), final)
    prune(Path(root), keep_last, final)
    return final

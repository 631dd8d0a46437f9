"""The on-disk protocol of checkpoints: directories, the COMPLETE manifest,
the ``latest`` pointer, verification, publication and pruning.

A checkpoint is written into ``step_<N>.tmp/``, sealed with a ``COMPLETE``
manifest (every file with its size and SHA-256), renamed to ``step_<N>/`` and
only then named in ``latest``. ``latest`` is the commit point: a crash at any
earlier moment leaves the previous checkpoint as the one a resume picks.
Checkpoints are never deleted except by pruning; one that must leave the way
is *set aside*: renamed to ``step_<N>.<reason>-<UTC time>``, which no resume,
save or prune looks at again. Nothing here touches torch.distributed; the
caller runs the rank-0-only steps on rank 0.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from mtrain.train.checksums import ALGORITHM, file_digests, shares

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
DCP_METADATA = ".metadata"
TMP_SUFFIX = ".tmp"
# 2: components are Stateful (model, optimizer with its step; progress, data, lr, rng per rank).
FORMAT_VERSION = 2
# Why a directory was set aside (the suffix of its new name).
CORRUPT = "corrupt"  # failed verification
SUPERSEDED = "superseded"  # newer than the checkpoint a run resumed from, replaced, or left by a fresh start
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


def set_aside(path: Path, reason: str) -> Path:
    """Rename ``path`` (a checkpoint directory or ``latest``) to
    ``<name>.<reason>-<UTC time>`` next to it, never over an existing name;
    the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = path.with_name(f"{path.name}.{reason}-{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{reason}-{stamp}-{n}"), n + 1
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name, flush it to disk, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise
    _fsync_dir(path.parent)


def build_manifest(directory: Path, step: int, world_size: int,
                   checksums: Optional[Mapping[str, str]] = None) -> dict:
    """The manifest of a fully written directory: every file with its size and
    SHA-256. ``checksums`` (relative path -> digest) gives digests the writers
    computed already; the other files are hashed here, one streaming pass each."""
    checksums = checksums or {}
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MARKER:
            continue
        files[rel] = {"size": path.stat().st_size}
    missing = [directory / rel for rel in files if rel not in checksums]
    computed = {p.relative_to(directory).as_posix(): d for p, d in file_digests(missing).items()}
    for rel, entry in files.items():
        entry[ALGORITHM] = checksums.get(rel) or computed[rel]
    if DCP_METADATA not in files:
        raise CorruptCheckpointError(f"{directory}: no {DCP_METADATA} was written; the save did not finish")
    return {"format": FORMAT_VERSION, "step": step, "world_size": world_size,
            "created": time.time(), "files": files}


def seal(directory: Path, step: int, world_size: int, checksums: Optional[Mapping[str, str]] = None) -> dict:
    """Write the COMPLETE manifest into a fully written directory."""
    manifest = build_manifest(directory, step, world_size, checksums)
    write_atomic(directory / MARKER, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def publish(tmp: Path, final: Path) -> None:
    """Rename a sealed temporary directory to its final name; a checkpoint of
    the same step saved earlier is set aside (``.superseded-<time>``), not deleted."""
    if final.exists():
        log.warning("%s exists already: set aside as %s", final, set_aside(final, SUPERSEDED).name)
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


def verify_checkpoint(path: Path | str, *, part: int = 0, parts: int = 1, checksums: bool = True) -> dict:
    """Check a checkpoint against its manifest; return the manifest.

    Raises :class:`CorruptCheckpointError` naming the first problem: a missing
    directory, marker or file, a size or checksum mismatch, an unreadable file.
    Every file's presence and size are checked; the checksums of share
    ``part`` of ``parts`` (files split by bytes, see :func:`checksums.shares`),
    so ``parts`` ranks verify a checkpoint together; ``checksums=False``
    checks presence and sizes only.
    """
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpointError(f"{path}: no such checkpoint directory")
    manifest = read_manifest(path)
    files = manifest["files"]
    if DCP_METADATA not in files:
        raise CorruptCheckpointError(f"{path}: the manifest does not list {DCP_METADATA}")
    try:
        for rel, entry in sorted(files.items()):
            file = path / rel
            if not file.is_file():
                raise CorruptCheckpointError(f"{file}: listed in the manifest but missing")
            size = file.stat().st_size
            if size != entry["size"]:
                raise CorruptCheckpointError(f"{file}: {size} bytes on disk, the manifest says {entry['size']} "
                                             f"(truncated or overwritten)")
        if checksums:
            _verify_checksums(path, files, shares({rel: e["size"] for rel, e in files.items()}, parts)[part])
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: unreadable ({e})") from e
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path / MARKER}: unreadable manifest ({e!r})") from e
    return manifest


def _verify_checksums(path: Path, files: Mapping[str, dict], mine: list[str]) -> None:
    unchecked = sorted(rel for rel in mine if ALGORITHM not in files[rel])
    if unchecked:  # large files in checkpoints written before every file had a checksum
        log.warning("%s: %d files have no checksum in the manifest (an older mtrain wrote it); checked by size "
                    "only: %s", path, len(unchecked), ", ".join(unchecked[:4]))
    found = file_digests(path / rel for rel in mine if ALGORITHM in files[rel])
    for file in sorted(found):
        if found[file] != files[file.relative_to(path).as_posix()][ALGORITHM]:
            raise CorruptCheckpointError(f"{file}: checksum differs from the manifest (corrupted)")


def latest_name(root: Path | str) -> Optional[str]:
    """The directory name ``latest`` gives, or None without a ``latest`` file."""
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


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


def resolve_checkpoint(path: Path | str) -> Path:
    """The checkpoint ``path`` names: itself when it is a complete ``step_N``
    directory (files present, sizes right; loading checks the checksums), else
    (a checkpoint root) the one :func:`find_latest` picks."""
    path = Path(path)
    if (path / MARKER).is_file():
        verify_checkpoint(path, checksums=False)
        return path
    found = find_latest(path)
    if found is None:
        raise CorruptCheckpointError(f"{path}: no complete checkpoint (neither a step_N directory with "
                                     f"{MARKER} nor a checkpoint root holding one)")
    return found


def remove_stale_tmp(root: Path, keep: Optional[Path] = None) -> None:
    """Delete leftovers of interrupted saves (every ``*.tmp`` but ``keep``)."""
    for path in Path(root).glob("*" + TMP_SUFFIX):
        if path != keep and path.is_dir():
            log.warning("removing %s left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)


def _counts(path: Path) -> bool:
    """Whether a kept checkpoint counts toward ``keep_last``: it verifies
    without re-reading its data (manifest, every file at its recorded size)."""
    try:
        verify_checkpoint(path, checksums=False)
        return True
    except CorruptCheckpointError as e:
        log.warning("not counted as a kept checkpoint: %s", e)
        return False


def prune(root: Path, keep_last: int, current: Path) -> list[Path]:
    """Delete the complete checkpoints older than the newest ``keep_last`` that
    verify (``current``, just written, counts; the others by :func:`_counts`).
    Never ``current`` nor anything newer; incomplete final-named and set-aside
    directories are left alone."""
    if keep_last <= 0:
        return []
    kept, removed = 0, []
    for path in reversed(step_dirs(root)):  # newest first
        if path == current or step_of(path) > step_of(current):
            kept += path == current or ((path / MARKER).is_file() and _counts(path))
        elif not (path / MARKER).is_file():
            continue
        elif kept >= keep_last:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        else:
            kept += _counts(path)
    return removed


def finalize(root: Path, step: int, world_size: int, keep_last: int,
             checksums: Optional[Mapping[str, str]] = None) -> Path:
    """Seal, publish, point ``latest`` at, and prune around the checkpoint of
    ``step`` whose files are all in its temporary directory (rank 0 only).
    ``checksums``: digests the writers computed (see :func:`build_manifest`).
    Once ``latest`` names the checkpoint the save has succeeded: a failure to
    prune is a warning."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    seal(tmp, step, world_size, checksums)
    reach("sealed")
    publish(tmp, final)
    reach("published")
    update_latest(Path(root), final)
    try:
        prune(Path(root), keep_last, final)
    except OSError as e:
        log.warning("pruning old checkpoints under %s failed: %s", root, e)
    return final

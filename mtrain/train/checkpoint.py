"""Distributed checkpoints that store logical tensors, so any layout can load them.

Parameter names are global and every tensor's tag (:class:`ParamMeta`) says
how its local tensor is a slice of the full one. Saving turns each local
tensor into its *logical* form for ``torch.distributed.checkpoint`` (DCP):

- replicated tensors stay plain tensors (DCP writes identical keys once);
- a tensor split over groups becomes a ``DTensor`` over a device mesh built
  from those groups: ``Shard(0)`` over ``ep`` for experts, ``Shard(shard_dim)``
  over ``shard_group`` for TP;
- vocabulary-padded tensors drop their padding rows first, so the logical
  tensor has exactly ``full_size`` rows whatever the TP size. The padded
  split (``ceil(V / tp)`` rows per rank) is DTensor's uneven ``Shard`` split.

Loading builds the same structure for the *current* layout and DCP reads
into this rank's local slices in place, resharding as needed. The directory
protocol (temporary directory, manifest, ``latest``) is in
:mod:`mtrain.train.checkpoint_files`.

Every save step that can fail on storage (a full disk) is agreed on by all
ranks: a failure anywhere removes the temporary directory and raises
:class:`CheckpointSaveError` on every rank, leaving the previous checkpoint
and ``latest`` as they were. Each rank checksums the files it wrote right
after writing them; rank 0 seals the manifest with those digests.

What is saved comes from named ``Stateful`` components (``state_dict()`` /
``load_state_dict()``). *Sharded* components give global name -> local tensor
and go through DCP as above; *per-rank* components give small picklable state
stored in each rank's ``extra`` file. A :class:`Checkpointer` owns the state
of one run's checkpointing: the save in flight and the gloo group.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from mtrain.model.params import ParamMeta, meta
from mtrain.train.checkpoint_errors import (CheckpointError, CheckpointSaveError, Failure, ResumeRefused,
                                            save_error, storage_failure)
from mtrain.train.checkpoint_files import (FORMAT_VERSION, CorruptCheckpointError, finalize, find_latest,
                                           latest_name, read_manifest, reach, remove_stale_tmp, step_dir, tmp_dir,
                                           verify_checkpoint)
from mtrain.train.checksums import file_digests

__all__ = ["Checkpointer", "CheckpointSave", "find_latest", "verify_checkpoint", "read_manifest",
           "CorruptCheckpointError", "CheckpointError", "CheckpointSaveError", "ResumeRefused", "stored_dtypes"]

log = logging.getLogger(__name__)

EXTRA_DIR = "extra"


# -- the logical view of local tensors -----------------------------------------

def _group_size(groups, kind: str) -> int:
    return 1 if groups is None else groups.size(kind)


def _shardings(m: ParamMeta, groups) -> list[tuple[int, str]]:
    """(dim, group kind) of every split this rank's tensor is a shard of."""
    splits = []
    if m.expert:
        splits.append((0, "ep"))
    if m.shard_dim is not None:
        splits.append((m.shard_dim, m.shard_group))
    return [(dim, kind) for dim, kind in splits if _group_size(groups, kind) > 1]


def _unpadded(name: str, local: torch.Tensor, m: ParamMeta, groups) -> torch.Tensor:
    """The rows of ``local`` that are real (not vocabulary padding), as a view."""
    if m.full_size is None:
        return local
    dim, size = m.shard_dim, _group_size(groups, m.shard_group)
    index = 0 if size == 1 else groups.index(m.shard_group)
    chunk = -(-m.full_size // size)
    if local.shape[dim] != chunk:
        raise ValueError(f"{name}: holds {local.shape[dim]} rows along dim {dim}, but {m.full_size} rows "
                         f"padded over {size} ranks give {chunk} per rank")
    real = max(0, min(chunk, m.full_size - index * chunk))
    return local.narrow(dim, 0, real)


def _full_shape(tensor: torch.Tensor, m: ParamMeta, splits: list[tuple[int, str]], groups) -> tuple[int, ...]:
    shape = list(tensor.shape)
    for dim, kind in splits:
        shape[dim] *= groups.size(kind)
    if m.full_size is not None:
        shape[m.shard_dim] = m.full_size
    return tuple(shape)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class _Meshes:
    """Device meshes over this rank's groups, built once per (kinds, device)."""

    def __init__(self, groups):
        self.groups = groups
        self.cache: dict = {}

    def get(self, kinds: tuple[str, ...], device_type: str) -> DeviceMesh:
        key = (kinds, device_type)
        if key not in self.cache:
            self.cache[key] = self._build(kinds, device_type)
        return self.cache[key]

    def _build(self, kinds: tuple[str, ...], device_type: str) -> DeviceMesh:
        g = self.groups
        if len(kinds) == 1:
            return DeviceMesh.from_group(g.group(kinds[0]), device_type)
        outer, inner = kinds
        # Column j is the `outer` group through the j-th member of my `inner` group;
        # each row must then be an `inner` group for the ranks to form a grid.
        columns = [g.layout.group_of(outer, r) for r in g.ranks(inner)]
        mesh = [list(row) for row in zip(*columns)]
        for row in mesh:
            if row != g.layout.group_of(inner, row[0]):
                raise ValueError(f"the {outer} and {inner} groups of rank {g.rank} do not form a grid: {mesh}")
        return DeviceMesh.from_group([g.group(outer), g.group(inner)], device_type,
                                     mesh=torch.tensor(mesh), mesh_dim_names=kinds)


def _logical(name: str, tensor: torch.Tensor, m: ParamMeta, groups, meshes: _Meshes):
    """What DCP saves or loads for ``tensor``: a plain tensor or a DTensor whose
    local part is a view of ``tensor`` (so loading writes into it)."""
    local = _unpadded(name, tensor.detach(), m, groups)
    splits = _shardings(m, groups)
    if not splits:
        return local
    shape = _full_shape(tensor, m, splits, groups)
    mesh = meshes.get(tuple(kind for _, kind in splits), tensor.device.type)
    return DTensor.from_local(local, mesh, [Shard(dim) for dim, _ in splits], run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_strides(shape))


def _meta_of(name: str, tensor: torch.Tensor, metas: Optional[Mapping[str, ParamMeta]]) -> ParamMeta:
    if metas is not None and name in metas:
        return metas[name]
    return meta(tensor)


def logical_state_dict(tensors: Mapping[str, torch.Tensor], groups,
                       metas: Optional[Mapping[str, ParamMeta]] = None) -> dict[str, Any]:
    """Global name -> the logical value DCP saves or loads (see module doc)."""
    meshes = _Meshes(groups)
    return {name: _logical(name, t, _meta_of(name, t, metas), groups, meshes) for name, t in tensors.items()}


# -- collectives ----------------------------------------------------------------

def _rank(pg) -> int:
    return 0 if pg is None else dist.get_rank()


def _world(pg) -> int:
    return 1 if pg is None else dist.get_world_size()


@contextlib.contextmanager
def _single_process_quiet(pg):
    """DCP warns that it assumes a single process whenever it runs without
    torch.distributed; here that is the intent."""
    with warnings.catch_warnings():
        if pg is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _raise_if_any(error: Optional[Exception], pg) -> None:
    """Raise on every rank if any rank hit ``error`` (a KeyError or ValueError),
    so no rank is left waiting in a collective the failing one never joins."""
    mine = None if error is None else (isinstance(error, KeyError), str(error.args[0]))
    found = [mine]
    if pg is not None:
        found = [None] * _world(pg)
        dist.all_gather_object(found, mine, group=pg)
    failures = [(r, f) for r, f in enumerate(found) if f is not None]
    if failures:
        kind = KeyError if any(is_key for _, (is_key, _) in failures) else ValueError
        raise kind("\n".join(f"rank {r}: {message}" for r, (_, message) in failures))


def _collect_error(fn):
    try:
        return fn(), None
    except (ValueError, KeyError) as e:
        return None, e


def _all_gather(value, pg) -> list:
    if pg is None:
        return [value]
    found = [None] * _world(pg)
    dist.all_gather_object(found, value, group=pg)
    return found


def _broadcast(value, pg):
    if pg is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=pg)  # pg spans all ranks
    return box[0]


def _save_failed(root: Path, step: int, failures: list[Failure], pg, context: str = "") -> None:
    """Raise on every rank if any rank failed (every rank passes the same
    list). Storage failures only: rank 0 removes the temporary directory and
    all raise :class:`CheckpointSaveError`; otherwise a ``RuntimeError`` naming
    the ranks (the directory stays for inspection, as after a crash)."""
    if not failures:
        return
    if all(f.errno is not None for f in failures):
        if _rank(pg) == 0:
            shutil.rmtree(tmp_dir(root, step), ignore_errors=True)
        raise save_error(root, step, failures[0], latest_name(root))
    raise RuntimeError(context + "; ".join(f"rank {f.rank}: {f.message}" for f in failures))


def _agree(root: Path, step: int, pg, fn) -> list:
    """Run ``fn`` on every rank and gather the results; a failure on any rank
    is raised on every rank (see :func:`_save_failed`)."""
    try:
        result, failure = fn(), None
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        result, failure = None, Failure.of(_rank(pg), e)
    gathered = _all_gather((result, failure), pg)
    _save_failed(root, step, [f for _, f in gathered if f is not None], pg)
    return [r for r, _ in gathered]


def _dcp_step(root: Path, step: int, pg, fn):
    """Run a DCP call, which raises the same failure on every rank by itself;
    a storage failure becomes :class:`CheckpointSaveError` (see :func:`_save_failed`)."""
    try:
        return fn()
    except (Exception, CheckpointException) as e:
        failure = storage_failure(_rank(pg), e)
        if failure is None:
            raise
        _save_failed(root, step, [failure], pg)


# DCP names each data file after the rank that writes it: __<rank>_<n>.distcp.
_DCP_DATA = re.compile(r"^__(\d+)_\d+\.distcp$")


def _own_digests(directory: Path, rank: int) -> dict[str, str]:
    """Checksums of the files this rank wrote into ``directory`` (its DCP
    data files and its extra file), read back right after writing; rank 0
    hashes the rest (``.metadata``) when it seals."""
    mine = [p for p in directory.iterdir() if (m := _DCP_DATA.match(p.name)) and int(m.group(1)) == rank]
    mine.append(_extra_file(directory, rank))
    return {p.relative_to(directory).as_posix(): d for p, d in file_digests(mine).items()}


# -- components --------------------------------------------------------------------

def _sharded_states(components: Mapping[str, Stateful]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Each sharded component's ``state_dict()``, and all their tensors by
    global name; a name given by two components is an error."""
    states, tensors, owner = {}, {}, {}
    for key, component in components.items():
        states[key] = component.state_dict()
        for name, tensor in states[key].items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name} of sharded component {key!r} is a {type(tensor).__name__}, not a tensor")
            if name in tensors:
                raise ValueError(f"{name}: given by both sharded components {owner[name]!r} and {key!r}")
            tensors[name], owner[name] = tensor, key
    return states, tensors


def _extra_file(directory: Path, rank: int) -> Path:
    return directory / EXTRA_DIR / f"rank_{rank:05d}.pt"


# -- saving -----------------------------------------------------------------------

class CheckpointSave:
    """A save in flight (or done): ``wait()`` returns the final directory once it
    is complete and ``latest`` names it, and re-raises any failure."""

    def __init__(self, path: Path, future: Optional[Future] = None):
        self.path = path
        self._future = future

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self) -> Path:
        if self._future is not None:
            self._future.result()
        return self.path


def _finish(root: Path, step: int, keep_last: int, pg) -> Path:
    """Every rank: after all data is written, each checksums its own files,
    rank 0 seals (with those digests) and publishes; all ranks learn the outcome."""
    reach("written")
    tmp, rank = tmp_dir(root, step), _rank(pg)
    gathered = _agree(root, step, pg, lambda: _own_digests(tmp, rank))  # also the barrier before sealing
    failure = None
    if rank == 0:
        try:
            required = [_extra_file(tmp, r) for r in range(_world(pg))]
            missing = [str(p) for p in required if not p.is_file()]
            if missing:
                raise CorruptCheckpointError(f"extra state missing after the save: {missing}")
            finalize(root, step, _world(pg), keep_last, checksums={k: v for d in gathered for k, v in d.items()})
        except Exception as e:  # reported on every rank below
            failure = Failure.of(0, e)
    failure = _broadcast(failure, pg)
    context = f"finalising checkpoint {step_dir(root, step)} failed: "
    _save_failed(root, step, [failure] if failure else [], pg, context)
    return step_dir(root, step)


# -- loading ----------------------------------------------------------------------

def _is_optional(name: str, optional: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in optional)


def _plan_load(path: Path, tensors, groups, metas, optional) -> dict[str, Any]:
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    missing = sorted(n for n in tensors if n not in stored and not _is_optional(n, optional))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise KeyError(f"checkpoint {path} lacks {len(missing)} expected tensors: {shown} "
                       f"(pass optional= patterns to skip them, e.g. 'optim.*')")
    state = logical_state_dict({n: t for n, t in tensors.items() if n in stored}, groups, metas)
    for name, value in state.items():
        entry = stored[name]
        if not isinstance(entry, TensorStorageMetadata):
            raise KeyError(f"{name}: stored in {path} as a non-tensor object")
        if tuple(entry.size) != tuple(value.shape):
            raise ValueError(f"{name}: the checkpoint holds shape {tuple(entry.size)} but this model "
                             f"expects {tuple(value.shape)} (a different model config?)")
    return state


def stored_dtypes(path: Path | str) -> dict[str, torch.dtype]:
    """Tensor name -> the dtype it is stored in, from the checkpoint's DCP
    metadata alone (no tensor is read)."""
    stored = dcp.FileSystemReader(Path(path)).read_metadata().state_dict_metadata
    return {name: entry.properties.dtype for name, entry in stored.items()
            if isinstance(entry, TensorStorageMetadata)}


def _read_extra(path: Path, rank: int, wanted: Iterable[str], optional) -> dict:
    extra = torch.load(_extra_file(path, rank), weights_only=False)
    missing = sorted(k for k in wanted if k not in extra and not _is_optional(k, optional))
    if missing:
        raise KeyError(f"checkpoint {path} lacks the per-rank state of {', '.join(missing)}")
    return extra


def _zero_padding(tensors, groups, metas) -> None:
    """Vocabulary padding rows are not in the checkpoint; keep them zero."""
    with torch.no_grad():
        for name, t in tensors.items():
            m = _meta_of(name, t, metas)
            if m.full_size is None:
                continue
            real = _unpadded(name, t.detach(), m, groups).shape[m.shard_dim]
            t.detach().narrow(m.shard_dim, real, t.shape[m.shard_dim] - real).zero_()


# -- the checkpointer ---------------------------------------------------------------

class Checkpointer:
    """Saves checkpoints of a run under ``root`` and loads any checkpoint;
    ``save`` and ``load`` are collective over all ranks.

    ``groups`` is the run's ``ParallelGroups`` (None in a single process).
    ``keep_last`` complete checkpoints are kept (0: all). With ``async_save``
    the data is copied to CPU memory during ``save``, then written and
    finalised in the background; the next save or load, or :meth:`wait`, joins it.
    """

    def __init__(self, root: Path | str, groups=None, *, keep_last: int = 2, async_save: bool = False):
        self.root = Path(root)
        self.groups = groups
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: Optional[CheckpointSave] = None
        self._pg = None
        self._verified: dict[Path, dict] = {}  # path -> manifest, verified by all ranks since the last save

    def _group(self):
        """A gloo group over all ranks for checkpoint traffic only, so an async
        save's background collectives never interleave with training collectives
        (and a CPU backend exists even when training runs on NCCL). Created on
        first use, which every rank reaches together; None without
        torch.distributed."""
        if self._pg is None and dist.is_initialized():
            self._pg = dist.new_group(backend="gloo")
        return self._pg

    def wait(self) -> Optional[Path]:
        """Block until an earlier async save has finished; call before exiting."""
        handle, self._pending = self._pending, None
        return handle.wait() if handle is not None else None

    def verify(self, path: Path | str) -> dict:
        """Verify the checkpoint at ``path`` against its manifest, all ranks
        together: each checks every file's presence and size and the checksums
        of its share of the files. Collective; returns the manifest or raises
        :class:`CorruptCheckpointError` on every rank naming every problem
        found. A path verified since the last save is not read again."""
        path = Path(path)
        if path in self._verified:
            return self._verified[path]
        pg = self._group()
        try:
            manifest, problem = verify_checkpoint(path, part=_rank(pg), parts=_world(pg)), None
        except CorruptCheckpointError as e:
            manifest, problem = None, str(e)
        problems = sorted({p for p in _all_gather(problem, pg) if p is not None})
        if problems:
            raise CorruptCheckpointError("; ".join(problems))
        self._verified[path] = manifest
        return manifest

    def on_rank0(self, fn):
        """Run ``fn()`` on rank 0 only and return its result on every rank;
        its exception is raised on every rank (as ``RuntimeError`` elsewhere). Collective."""
        pg = self._group()
        result = error = None
        if _rank(pg) == 0:
            try:
                result = fn()
            except Exception as e:
                error = e
        result, message = _broadcast((result, error and f"rank 0: {type(error).__name__}: {error}"), pg)
        if error is not None:
            raise error
        if message:
            raise RuntimeError(message)
        return result

    def save(self, step: int, sharded: Mapping[str, Stateful],
             per_rank: Optional[Mapping[str, Stateful]] = None, *,
             metas: Optional[Mapping[str, ParamMeta]] = None) -> CheckpointSave:
        """Save the components under ``root/step_<step>``.

        ``sharded`` components' ``state_dict()`` give global name -> this rank's
        local tensor, saved as logical tensors. A rank may omit names other
        ranks give (ZeRO-1: only the optimizer states it owns); replicated names
        must hold identical values on every rank that gives them. ``per_rank``
        components' state (small, picklable) is stored per rank. Returns a
        handle whose ``wait()`` gives the final directory.
        """
        self.wait()
        self._verified.clear()
        per_rank = per_rank or {}
        root, pg = self.root, self._group()
        rank = _rank(pg)
        tmp = tmp_dir(root, step)

        def prepare():
            if rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                remove_stale_tmp(root)
                (tmp / EXTRA_DIR).mkdir(parents=True)

        _agree(root, step, pg, prepare)  # also the barrier before anyone writes
        state, error = _collect_error(lambda: logical_state_dict(_sharded_states(sharded)[1], self.groups, metas))
        _raise_if_any(error, pg)
        extra = {key: component.state_dict() for key, component in per_rank.items()}
        _agree(root, step, pg, lambda: torch.save(extra, _extra_file(tmp, rank)))

        if not self.async_save:
            with _single_process_quiet(pg):
                _dcp_step(root, step, pg, lambda: dcp.save(state, checkpoint_id=tmp, process_group=pg,
                                                         no_dist=pg is None))
            return CheckpointSave(_finish(root, step, self.keep_last, pg))

        with _single_process_quiet(pg):
            upload = dcp.async_save(state, checkpoint_id=tmp, process_group=pg, no_dist=pg is None)
        upload = getattr(upload, "upload_completion", upload)
        keep_last = self.keep_last

        def complete() -> Path:
            _dcp_step(root, step, pg, upload.result)
            return _finish(root, step, keep_last, pg)

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-finalise")
        self._pending = CheckpointSave(step_dir(root, step), executor.submit(complete))
        executor.shutdown(wait=False)
        return self._pending

    def load(self, path: Path | str, sharded: Mapping[str, Stateful],
             per_rank: Optional[Mapping[str, Stateful]] = None, *,
             metas: Optional[Mapping[str, ParamMeta]] = None, optional: Iterable[str] = ()) -> None:
        """Restore the components (current layout) from the checkpoint at ``path``.

        The checkpoint is verified first (:class:`CorruptCheckpointError`). The
        tensors of the ``sharded`` components' ``state_dict()`` are filled in
        place, then each component's ``load_state_dict`` gets that dict. Each
        ``per_rank`` component gets its saved state: this rank's when the world
        size is unchanged, otherwise rank 0's. A tensor name or per-rank
        component the checkpoint lacks raises ``KeyError`` unless it matches one
        of the ``optional`` fnmatch patterns (it is then left untouched).
        """
        self.wait()
        per_rank = per_rank or {}
        path = Path(path)
        manifest = self.verify(path)
        if manifest.get("format", 1) != FORMAT_VERSION:
            raise ValueError(f"{path}: written in checkpoint format {manifest.get('format', 1)}, this mtrain reads "
                             f"format {FORMAT_VERSION}; resume it with the mtrain release that wrote it, or start "
                             f"this run from another checkpoint directory")
        pg = self._group()
        optional = tuple(optional)
        rank, saved_world = _rank(pg), manifest["world_size"]
        if saved_world != _world(pg):
            log.warning("checkpoint %s was saved by %d ranks, now %d: every rank gets rank 0's per-rank state",
                        path, saved_world, _world(pg))
            rank = 0

        def plan():
            states, tensors = _sharded_states(sharded)
            extra = _read_extra(path, rank, per_rank, optional)
            return states, tensors, extra, _plan_load(path, tensors, self.groups, metas, optional)

        planned, error = _collect_error(plan)
        _raise_if_any(error, pg)
        states, tensors, extra, state = planned
        with _single_process_quiet(pg):
            dcp.load(state, checkpoint_id=path, process_group=pg, no_dist=pg is None)
        _zero_padding(tensors, self.groups, metas)
        for key, component in sharded.items():
            component.load_state_dict(states[key])
        for key, component in per_rank.items():
            if key in extra:
                component.load_state_dict(extra[key])

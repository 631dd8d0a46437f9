"""Check, on CPU, that collectives get tensors a device-bound group could take.

Under NCCL every tensor handed to a collective must be on the GPU; a CPU
tensor fails. Under gloo the collective device is the CPU, so a tensor made
with ``torch.tensor(x)`` (on the host by default) and one made with
``torch.tensor(x, device=collective_device())`` look the same and the bug
stays hidden until the first GPU run. :func:`device_discipline` makes it
visible on CPU:

* **Host-made tensors** (a taint analysis, a :class:`TorchFunctionMode`): a
  tensor is host-made when a factory (``torch.tensor``, ``zeros``, ``empty``,
  ``arange``, ``randn``, ``from_numpy``, ...) made it without ``device=``, or
  with the string ``"cpu"``; when ``.cpu()`` or ``.to("cpu")`` made it; or when
  an op computed it from host-made tensors only. An explicit device (a
  ``torch.device`` object, ``"cuda"``, an index), a ``.to(device)``, or any
  untagged input (parameters, autograd gradients, tensors made outside the
  mode) makes a tensor clean. In-place ops keep their tensor's mark.
* **Checked collectives**: while the mode is on, the tensor collectives of
  ``torch.distributed`` (``all_reduce``, ``broadcast``, ``all_gather*``,
  ``reduce_scatter*``, ``all_to_all*``, ``gather``, ``scatter``, ``send``/
  ``recv``, ``isend``/``irecv``, ``batch_isend_irecv``) check every tensor
  argument before running: a host-made tensor on a device-bound group is a
  :class:`DeviceDisciplineError` naming the rank, the collective, the group
  and the first mtrain frame that called it. Object collectives and
  ``barrier`` are not checked (torch places their tensors itself).

Which groups are device-bound: with ``device_bound=True`` every group is,
as if the default backend were NCCL, except a group created *while the mode
is on* with an explicit ``backend="gloo"`` (``new_group``, ``new_subgroups``,
``new_subgroups_by_enumeration``: on a GPU run that group takes CPU
tensors), or one passed in ``host_groups``. On CPU the world and an explicit
gloo group report the same backend, so the explicit request is the only
sign. ``device_bound=None`` follows the real default backend (NCCL: bound).

Limits: a tensor made with ``device=torch.device("cpu")`` (an object, not the
string) counts as placed on purpose; ops run in other threads are not
tagged (the mode is per thread); ``.to(device)`` that returns its own input
(it does on CPU) clears that object's mark. Only calls through the
``torch.distributed`` namespace are checked: capture a collective at import
time and it escapes.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

__all__ = ["DeviceDiscipline", "DeviceDisciplineError", "Violation", "device_discipline"]

# Tensor collectives checked (those this torch has).
CHECKED = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single", "all_to_all",
    "gather", "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)
# Group constructors watched for an explicit gloo backend.
GROUP_MAKERS = ("new_group", "new_subgroups", "new_subgroups_by_enumeration")

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../mtrain
_ROOT = os.path.dirname(_PACKAGE)
_KERNELS = os.path.join(_ROOT, "kernels")  # installed as mtrain.kernels
_TESTING = os.path.join(_PACKAGE, "testing")

FIX = "create it with device=collective_device(group) (or the trainer's device)"

_active: Optional["DeviceDiscipline"] = None


class DeviceDisciplineError(RuntimeError):
    """A collective got a tensor a device-bound (NCCL) group would refuse."""

    def __init__(self, violations: list["Violation"]):
        self.violations = violations
        super().__init__("\n".join(v.message() for v in violations))


@dataclass(frozen=True)
class Violation:
    rank: int
    collective: str
    argument: str  # e.g. "tensor", "tensor_list[1]", "p2p_op_list[0].tensor (isend)"
    group: str
    site: str
    reason: str

    def message(self) -> str:
        return (f"rank {self.rank}: {self.collective}({self.argument}=...) on {self.group} got {self.reason}, "
                f"at {self.site}; under NCCL this fails: {FIX}")


# Factories from data: on the host unless given a tensor (which they keep where it is).
_FROM_DATA = {torch.as_tensor, torch.asarray}


def _names_host(device: Any) -> bool:
    """Whether an explicit ``device=`` value means the host: None (the default)
    or a string naming the CPU. A ``torch.device`` object counts as deliberate."""
    if device is None:
        return True
    if isinstance(device, str):
        return torch.device(device).type == "cpu"
    return False


def _tensors_in(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    yield item


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


def _to_target(args: tuple, kwargs: dict) -> tuple[Optional[bool], Optional[torch.Tensor]]:
    """For ``Tensor.to(...)``: (host?, None) when a device is named, (None, other)
    for ``to(other)``, (None, None) for a dtype-only conversion."""
    if "device" in kwargs and kwargs["device"] is not None:
        return _names_host(kwargs["device"]), None
    if "other" in kwargs and isinstance(kwargs["other"], torch.Tensor):
        return None, kwargs["other"]
    if len(args) > 1:
        first = args[1]
        if isinstance(first, torch.Tensor):
            return None, first
        if isinstance(first, (str, torch.device, int)) and not isinstance(first, bool):
            return _names_host(first), None
    return None, None


def _rel(path: str) -> str:
    return os.path.relpath(path, _ROOT) if path.startswith(_ROOT + os.sep) else path


def _ours(path: str) -> bool:
    return path.startswith((_PACKAGE + os.sep, _KERNELS + os.sep)) and not path.startswith(_TESTING + os.sep)


def _call_site() -> str:
    """Where the collective was called: the first frame inside mtrain (outside
    mtrain/testing) and its mtrain caller; when the direct caller is not mtrain
    code, that caller and then the first mtrain frame; with no mtrain frame at
    all, the direct caller. Frames of this module, torch and the standard
    library's decorator helpers are skipped."""
    skipped_dirs = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,)
    skipped_files = {os.path.abspath(__file__), os.path.abspath(contextlib.__file__),
                     os.path.abspath(functools.__file__)}
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path not in skipped_files and not path.startswith(skipped_dirs):
            frames.append((frame, path))
        frame = frame.f_back
    if not frames:
        return "(unknown)"

    def describe(f) -> str:
        return f"{_rel(os.path.abspath(f.f_code.co_filename))}:{f.f_lineno} in {f.f_code.co_name}"

    mine = [f for f, path in frames if _ours(path)]
    direct = frames[0][0]
    if not mine:
        return describe(direct)
    shown = [direct] + mine[:1] if direct is not mine[0] else mine[:2]
    return describe(shown[0]) + "".join(f" (called from {describe(f)})" for f in shown[1:])


class DeviceDiscipline(TorchFunctionMode):
    """The mode; use :func:`device_discipline`. ``violations`` lists what was
    found (with ``collect=True`` they are only listed, not raised); ``checked``
    counts the collectives checked, by name."""

    def __init__(self, device_bound: Optional[bool] = True, collect: bool = False, host_groups: Iterable = ()):
        super().__init__()
        self.device_bound = device_bound
        self.collect = collect
        self.violations: list[Violation] = []
        self.checked: collections.Counter = collections.Counter()
        self._host_groups = list(host_groups)  # ProcessGroups may not take weak references
        self._host: dict[int, weakref.ref] = {}  # id(tensor) -> weak reference, for host-made tensors
        self._saved: dict[str, Any] = {}
        self._entered = False

    # -- the taint -----------------------------------------------------------------------
    def is_host_made(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, t: torch.Tensor, host: bool) -> None:
        key, table = id(t), self._host
        if not host:
            table.pop(key, None)
        elif not self.is_host_made(t):
            # The entry leaves with the tensor: nothing here keeps a tensor alive.
            def forget(ref, key=key, table=table):
                if table.get(key) is ref:
                    del table[key]

            table[key] = weakref.ref(t, forget)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = _outputs(out)
        if not outputs:
            return out
        forced: Optional[bool] = None  # a result placed on purpose, even if it is an input
        inherited_from: Optional[list[torch.Tensor]] = None
        if func is torch.Tensor.cpu:
            forced = True
        elif func is torch.Tensor.cuda:
            forced = False
        elif func is torch.Tensor.to:
            forced, other = _to_target(args, kwargs)
            if other is not None:
                forced = self.is_host_made(other)
        elif kwargs.get("device") is not None:
            forced = _names_host(kwargs["device"])
        if forced is not None:
            for t in outputs:
                self._mark(t, forced)
            return out
        inputs = list(_tensors_in(args)) + list(_tensors_in(kwargs.values()))
        if func is torch.tensor or (func in _FROM_DATA and not (args and isinstance(args[0], torch.Tensor))):
            inputs = []  # built on the host from Python data (even a list of device scalars)
        if not inputs:  # a factory without device=
            host = True
        else:
            host = all(self.is_host_made(t) for t in inputs)
            inherited_from = inputs
        if host:
            # Results that are inputs (in-place ops, ``out=``) keep their own mark;
            # a clean result never clears a mark (only an explicit move does).
            for t in outputs:
                if inherited_from is None or not any(t is i for i in inherited_from):
                    self._mark(t, True)
        return out

    # -- the groups ----------------------------------------------------------------------
    def _default_bound(self) -> bool:
        if self.device_bound is None:
            return dist.get_backend() == "nccl"
        return self.device_bound

    def is_device_bound(self, group) -> bool:
        return self._default_bound() and not any(group is g for g in self._host_groups)

    def _describe_group(self, group) -> str:
        try:
            if group is None or group is dist.GroupMember.WORLD:
                return f"the default group ({dist.get_backend()}, {dist.get_world_size()} ranks)"
            return f"group of ranks {dist.get_process_group_ranks(group)} ({dist.get_backend(group)})"
        except Exception:  # noqa: BLE001 - a description must not hide the violation
            return repr(group)

    def _watch_group_maker(self, name: str, real):
        sig = inspect.signature(real)

        @functools.wraps(real)
        def make(*args, **kwargs):
            out = real(*args, **kwargs)
            try:
                backend = sig.bind(*args, **kwargs).arguments.get("backend")
            except TypeError:
                backend = None
            if backend is not None and str(backend).lower() == "gloo":
                groups = [out] if name == "new_group" else [out[0]] + list(out[1])
                self._host_groups.extend(g for g in groups if g is not None)
            return out

        return make

    # -- the collectives -----------------------------------------------------------------
    def _problems(self, name: str, bound: dict) -> list[tuple[str, torch.Tensor, Any, str]]:
        """(argument, tensor, group, reason) for each misplaced tensor."""
        if name == "batch_isend_irecv":
            items = []
            for i, op in enumerate(bound.get("p2p_op_list") or []):
                kind = getattr(op.op, "__name__", "op")
                items.append((f"p2p_op_list[{i}].tensor ({kind})", op.tensor, op.group))
        else:
            group = bound.get("group")
            items = []
            for arg, value in bound.items():
                if isinstance(value, torch.Tensor):
                    items.append((arg, value, group))
                elif isinstance(value, (list, tuple)):
                    items.extend((f"{arg}[{i}]", v, group) for i, v in enumerate(value) if isinstance(v, torch.Tensor))
        found = []
        for arg, t, group in items:
            if not self.is_device_bound(group):
                continue
            if self.is_host_made(t):
                found.append((arg, t, group, "a host-made tensor (a factory without device=, .cpu() or .to('cpu'))"))
            elif t.device.type == "cpu" and dist.get_backend(group) == "nccl":
                found.append((arg, t, group, "a CPU tensor"))
        return found

    def _check(self, name: str, sig: inspect.Signature, args: tuple, kwargs: dict) -> None:
        try:
            bound = sig.bind(*args, **kwargs).arguments
        except TypeError:
            return  # the real call raises its own error
        self.checked[name] += 1
        with torch._C.DisableTorchFunction():
            problems = self._problems(name, bound)
        if not problems:
            return
        site = _call_site()
        rank = dist.get_rank() if dist.is_initialized() else 0
        found = [Violation(rank, name, arg, self._describe_group(group), site, reason)
                 for arg, _, group, reason in problems]
        self.violations.extend(found)
        if not self.collect:
            raise DeviceDisciplineError(found)

    def _checked(self, name: str, real):
        sig = inspect.signature(real)

        @functools.wraps(real)
        def collective(*args, **kwargs):
            if _active is self:
                self._check(name, sig, args, kwargs)
            return real(*args, **kwargs)

        collective.__wrapped_collective__ = real
        return collective

    # -- on and off ----------------------------------------------------------------------
    def _install(self) -> None:
        for name in CHECKED:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._checked(name, self._saved[name]))
        for name in GROUP_MAKERS:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._watch_group_maker(name, self._saved[name]))
        # batch_isend_irecv tells sends from receives by identity (``op.op is isend``):
        # a P2POp holds the real functions, whichever the caller passed.
        self._saved["P2POp"] = dist.P2POp
        dist.P2POp = _P2POp
        mode = self
        real_from_numpy = torch.from_numpy  # not seen by torch-function modes

        @functools.wraps(real_from_numpy)
        def from_numpy(array):
            out = real_from_numpy(array)
            mode._mark(out, True)
            return out

        self._saved["from_numpy"] = real_from_numpy
        torch.from_numpy = from_numpy
        # nn.Parameter(data) wraps data in C++, unseen: the parameter takes its data's mark.
        real_new = torch.nn.Parameter.__new__

        def parameter(cls, *args, **kwargs):
            out = real_new(cls, *args, **kwargs)
            data = args[0] if args else kwargs.get("data")
            if isinstance(data, torch.Tensor) and mode.is_host_made(data):
                mode._mark(out, True)
            return out

        self._saved["Parameter.__new__"] = torch.nn.Parameter.__dict__["__new__"]
        torch.nn.Parameter.__new__ = parameter

    def _uninstall(self) -> None:
        for name, real in self._saved.items():
            if name == "from_numpy":
                torch.from_numpy = real
            elif name == "Parameter.__new__":
                torch.nn.Parameter.__new__ = real
            else:
                setattr(dist, name, real)
        self._saved.clear()

    def __enter__(self):
        global _active
        if _active is not None:
            raise RuntimeError("device_discipline is already on (it does not nest)")
        if self._entered:
            raise RuntimeError("a DeviceDiscipline is entered once; make a new one")
        self._entered = True
        _active = self
        self._install()
        try:
            return super().__enter__()
        except BaseException:
            self._uninstall()
            _active = None
            raise

    def __exit__(self, *exc):
        global _active
        try:
            return super().__exit__(*exc)
        finally:
            self._uninstall()
            _active = None
            self._host.clear()  # the marks mean nothing outside the mode


def _real(op):
    return getattr(op, "__wrapped_collective__", op)


class _P2POp(dist.P2POp):
    """``P2POp`` taking a checked ``isend``/``irecv`` for the real one."""

    def __new__(cls, op, *args, **kwargs):
        return super().__new__(cls, _real(op), *args, **kwargs)

    def __init__(self, op, *args, **kwargs):
        super().__init__(_real(op), *args, **kwargs)


@contextlib.contextmanager
def device_discipline(device_bound: Optional[bool] = True, collect: bool = False,
                      host_groups: Iterable = ()) -> Iterator[DeviceDiscipline]:
    """``with device_discipline(): ...``: every tensor collective checks its
    tensors as a device-bound (NCCL-like) group would (see the module doc).

    ``device_bound``: True treats the default backend as device-bound (the
    point, on CPU); None follows the real default backend. ``collect``: list
    violations in the yielded mode's ``violations`` and run the collective
    anyway, instead of raising (a rank that raises alone leaves the others
    waiting in the collective until their timeout).
    ``host_groups``: groups that take CPU tensors (made before the mode with
    an explicit gloo backend)."""
    mode = DeviceDiscipline(device_bound=device_bound, collect=collect, host_groups=host_groups)
    with mode:
        yield mode

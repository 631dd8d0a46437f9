"""Count host synchronisations, on CPU as they would happen on a GPU.

A host sync is the CPU waiting for the device: reading a value (``item()``,
``float(t)``, ``bool(t)``, ``tolist()``), copying device to host, or running
an op whose output size depends on the data (``bincount``, ``nonzero``,
boolean masks, ``repeat_interleave`` without ``output_size``). On CPU nothing
waits, but the same calls happen: :class:`HostSyncCounter` records them by
name so a test can pin the count of a hot path.
"""
from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose output shape depends on tensor values: on CUDA they copy a size to the host.
DATA_DEPENDENT = {
    aten.bincount.default, aten.nonzero.default, aten.masked_select.default,
    aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
    aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
}


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...``; ``syncs.count``, ``syncs.by_name``.

    ``where=True`` keeps the innermost mtrain frame of each sync, to find it.
    """

    def __init__(self, where: bool = False):
        super().__init__()
        self.by_name: collections.Counter = collections.Counter()
        self.where = where
        self.sites: collections.Counter = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.by_name.values())

    def _record(self, name: str) -> None:
        self.by_name[name] += 1
        if self.where:
            frames = [f for f in traceback.extract_stack()[:-2] if "/mtrain/" in f.filename or "/kernels/" in f.filename]
            if frames:
                self.sites[f"{name} @ {frames[-1].filename.split('/mtrain/')[-1]}:{frames[-1].lineno}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self._record("item")
        elif func in DATA_DEPENDENT:
            if not (func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)
                    and kwargs.get("output_size") is not None):
                self._record(func.__name__)
        elif func is aten._to_copy.default and _device_to_host(args, kwargs):
            self._record("to_host")
        return func(*args, **kwargs)

    def __enter__(self):
        # tolist() reads the data without dispatching on CPU: count it here.
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter._record("tolist")
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _device_to_host(args, kwargs) -> bool:
    src = args[0] if args else None
    dst = kwargs.get("device")
    return (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None
            and torch.device(dst).type == "cpu")

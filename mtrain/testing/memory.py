"""Peak memory of a stretch of work: on the device or, on CPU, as resident
set size (Linux: the RSS high-water mark, reset at the start), and exactly,
as live tensor bytes, on any device (:class:`LiveTensorMemory`)."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory() -> Optional[float]:
    """Start a new peak measurement; returns the current level in MiB."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:  # Linux: writing 5 resets the RSS high-water mark (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss / 1024


def peak_memory() -> Optional[float]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    hwm = _status_kib("VmHWM")
    return None if hwm is None else hwm / 1024


class LiveTensorMemory(TorchDispatchMode):
    """Exact tensor memory of a stretch of work on any device, CPU included:
    every storage an op creates counts from its creation until it is freed
    (or resized to nothing); ``peak_bytes`` is the most alive at once.
    Tensors that existed before (parameters, inputs) and views of them are
    not counted.
    """

    def __init__(self):
        super().__init__()
        self._storages: dict[int, weakref.ref] = {}
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: only new storages count.
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, tuple(kwargs.values())))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata  # one key per storage, whatever the view
            if key not in self._storages and key not in inputs:
                self._storages[key] = weakref.ref(storage)
                weakref.finalize(storage, self._storages.pop, key, None)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        total = 0
        for ref in list(self._storages.values()):
            storage = ref()
            if storage is not None:
                total += storage.nbytes()
        return total


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)

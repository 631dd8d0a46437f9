"""Backends of the routed experts' grouped GEMM (``model.grouped_gemm``).

Three products cover a grouped linear layer with ``x`` [R, in] grouped by
expert (``counts[e]`` rows each) and ``weight`` [E, out, in]:

* ``forward``      ``y[rows of e]  = x[rows of e] @ weight[e]^T``
* ``grad_input``   ``dx[rows of e] = dy[rows of e] @ weight[e]``
* ``grad_weight``  ``dw[e]         = dy[rows of e]^T @ x[rows of e]``

``torch`` loops over experts with plain matmuls (the reference, any device);
``grouped_mm`` is torch's grouped matmul (``torch.nn.functional.grouped_mm``:
one call for all experts, offsets on the device, nothing read back);
``triton`` runs :mod:`mtrain.kernels.grouped_gemm` (one launch for all experts;
CUDA, or CPU under ``TRITON_INTERPRET=1``). ``auto`` uses grouped_mm for CUDA
tensors when this torch has it, else triton when it imports, and torch for
CPU tensors.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

from mtrain.kernels import triton_interpreting

log = logging.getLogger(__name__)

KINDS = ("auto", "torch", "grouped_mm", "triton")
_INSTALL_HINT = ("model.grouped_gemm=triton needs the triton package: pip install triton "
                 "(or set model.grouped_gemm=torch)")


def _split(x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, counts, dim=0))


class TorchGroupedGemm:
    """The reference: one matmul per expert, each written straight into its
    block of the output (no per-expert results concatenated afterwards)."""

    name = "torch"

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], weight.shape[1])
        for e, (xe, ye) in enumerate(zip(_split(x, counts), _split(out, counts))):
            torch.mm(xe, weight[e].t(), out=ye)
        return out

    @staticmethod
    def grad_input(grad_out: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = grad_out.new_empty(grad_out.shape[0], weight.shape[2])
        for e, (g, ge) in enumerate(zip(_split(grad_out, counts), _split(out, counts))):
            torch.mm(g, weight[e], out=ge)
        return out

    @staticmethod
    def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = x.new_empty(len(counts), grad_out.shape[1], x.shape[1])
        for e, (g, xe) in enumerate(zip(_split(grad_out, counts), _split(x, counts))):
            torch.mm(g.t(), xe, out=out[e])  # an expert without rows gets zeros
        return out


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """End row of every expert's block (int32), queued to the device without a host wait."""
    ends = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    return ends.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ends


def grouped_mm_available() -> bool:
    return hasattr(torch.nn.functional, "grouped_mm")


class GroupedMMGemm:
    """torch's grouped matmul; the three products as three grouped calls.
    Shapes need 16-byte aligned rows (hidden and expert widths multiples of 8
    in bf16), which every model config here has."""

    name = "grouped_mm"

    @staticmethod
    def forward(x, weight, counts):
        return torch.nn.functional.grouped_mm(x, weight.transpose(1, 2), offs=_offsets(counts, x.device))

    @staticmethod
    def grad_input(grad_out, weight, counts):
        return torch.nn.functional.grouped_mm(grad_out, weight, offs=_offsets(counts, grad_out.device))

    @staticmethod
    def grad_weight(grad_out, x, counts):
        # 2-D x 2-D with the offsets splitting the shared (row) dimension: one [out, in] block per expert.
        return torch.nn.functional.grouped_mm(grad_out.t(), x, offs=_offsets(counts, x.device))


class TritonGroupedGemm:
    """The Triton kernels of :mod:`mtrain.kernels.grouped_gemm`."""

    name = "triton"

    def __init__(self):
        from mtrain.kernels import grouped_gemm

        self._k = grouped_gemm

    def forward(self, x, weight, counts):
        return self._k.grouped_matmul(x, weight.transpose(1, 2), counts)

    def grad_input(self, grad_out, weight, counts):
        return self._k.grouped_matmul(grad_out, weight, counts)

    def grad_weight(self, grad_out, x, counts):
        return self._k.grouped_weight_grad(grad_out, x, counts)


class AutoGroupedGemm:
    """``gpu_backend`` (grouped_mm or triton) for CUDA tensors, torch for the
    rest (CPU runs, CPU tests)."""

    name = "auto"

    def __init__(self, gpu_backend=None):
        self._gpu = gpu_backend

    def _pick(self, x: torch.Tensor):
        return self._gpu if self._gpu is not None and x.is_cuda else TorchGroupedGemm

    def forward(self, x, weight, counts):
        return self._pick(x).forward(x, weight, counts)

    def grad_input(self, grad_out, weight, counts):
        return self._pick(grad_out).grad_input(grad_out, weight, counts)

    def grad_weight(self, grad_out, x, counts):
        return self._pick(x).grad_weight(grad_out, x, counts)


def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


@functools.cache
def grouped_gemm_backend(kind: str = "auto"):
    """The backend object for ``kind``; fails at once (naming the package or
    the setting to change) when ``triton`` cannot run here."""
    if kind not in KINDS:
        raise ValueError(f"unknown model.grouped_gemm={kind!r}: use one of {', '.join(KINDS)}")
    if kind == "torch":
        return TorchGroupedGemm
    if kind == "grouped_mm":
        if not grouped_mm_available():
            raise RuntimeError(f"model.grouped_gemm=grouped_mm needs torch.nn.functional.grouped_mm "
                               f"(this torch is {torch.__version__}); set model.grouped_gemm=auto or torch")
        return GroupedMMGemm
    if kind == "triton":
        if not _triton_importable():
            raise ImportError(_INSTALL_HINT)
        if not torch.cuda.is_available() and not triton_interpreting():
            raise RuntimeError("model.grouped_gemm=triton needs CUDA, or TRITON_INTERPRET=1 to run the kernels "
                               "(slowly) on CPU; set model.grouped_gemm=torch or auto")
        return TritonGroupedGemm()
    if not torch.cuda.is_available():
        log.info("model.grouped_gemm=auto: torch (no CUDA)")
        return AutoGroupedGemm(None)
    if grouped_mm_available():
        log.info("model.grouped_gemm=auto: torch grouped_mm for CUDA tensors")
        return AutoGroupedGemm(GroupedMMGemm)
    use_triton = _triton_importable()
    log.info("model.grouped_gemm=auto: %s", "triton kernels for CUDA tensors" if use_triton
             else "torch (neither grouped_mm nor triton here)")
    return AutoGroupedGemm(TritonGroupedGemm() if use_triton else None)

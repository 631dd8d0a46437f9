"""Triton kernels of mtrain, installed as ``mtrain.kernels``.

Each kernel has a plain PyTorch reference beside it; Triton is imported lazily
so that CPU-only installs never need it.
"""
from __future__ import annotations

import os


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

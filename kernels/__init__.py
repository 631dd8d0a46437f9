"""Triton kernels of mtrain, installed as ``mtrain.kernels``.

Each kernel has a plain PyTorch reference beside it; Triton is imported lazily
so that CPU-only installs never need it.
"""

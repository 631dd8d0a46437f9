"""Helpers for running code on several gloo processes (tests, benchmarks)."""
from mtrain.testing.distributed import RankFailure, RankTimeout, run_distributed

__all__ = ["RankFailure", "RankTimeout", "run_distributed"]

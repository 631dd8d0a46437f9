"""Mixture-of-experts: router, dispatchers, grouped experts, the MoE layer."""

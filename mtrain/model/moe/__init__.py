"""Mixture-of-experts: router, dispatchers, grouped experts, the MoE layer."""
# The dispatcher backends register themselves on import.
from mtrain.model.moe import deepep as _deepep  # noqa: F401

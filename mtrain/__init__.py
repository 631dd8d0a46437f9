"""mtrain: DeepSeek-V3-style MoE training with TP/EP/DP/PP and DualPipe."""
__version__ = "0.1.0"

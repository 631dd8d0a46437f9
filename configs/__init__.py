"""The Hydra config tree, installed as ``mtrain.configs``."""

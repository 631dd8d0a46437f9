"""Compose the config tree outside a Hydra app (tests, tools, notebooks)."""
from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from mtrain.config.schema import register_configs

CONFIG_MODULE = "mtrain.configs"


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The composed config for ``overrides`` (Hydra command-line syntax)."""
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))

"""The config tree: dataclass schemas registered with Hydra, and validation."""
from mtrain.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    register_configs,
)
from mtrain.config.validate import ConfigError, check_config, config_errors

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "check_config",
    "config_errors",
    "register_configs",
]

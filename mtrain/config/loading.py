"""Compose the config tree outside a Hydra app (tests, tools, notebooks), and
check command-line choices before Hydra composes them."""
from __future__ import annotations

import sys
from typing import Callable, Iterable

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, OverrideType
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from mtrain.config.schema import register_configs
from mtrain.config.validate import ConfigError, choice_error, choice_fields, unknown_key_error

CONFIG_MODULE = "mtrain.configs"


def override_errors(args: Iterable[str]) -> list[str]:
    """A message for every bad value given to a choice field in ``args``
    (command-line arguments; flags and unparsable overrides are left to Hydra),
    and for every key that is not a field of the schema.

    OmegaConf rejects bad choices too, but in a multi-line report naming the
    schema class; this gives the same one-line form as the other config rules.
    An unknown key Hydra would refuse with advice to add it with ``+``, which
    it then accepts and nothing reads.
    """
    fields, parser, errors = choice_fields(), OverridesParser.create(), []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException:
            continue
        key = override.key_or_group
        if override.type != OverrideType.DEL and not key.startswith("hydra") and override.package is None:
            unknown = unknown_key_error(key)
            if unknown:
                errors.append(unknown)
                continue
        choices = fields.get(key)
        if choices is None or override.type == OverrideType.DEL:
            continue
        value = override.value()
        if override.is_sweep_override() and not isinstance(value, ChoiceSweep):
            continue  # glob, range and interval sweeps are Hydra's to expand and judge
        values = value.list if isinstance(value, ChoiceSweep) else [value]
        for v in values:
            # null and interpolations are OmegaConf's to judge.
            if v is None or (isinstance(v, str) and "${" in v):
                continue
            if v not in choices.values():
                errors.append(choice_error(override.key_or_group, v, choices))
    return errors


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The composed config for ``overrides`` (Hydra command-line syntax).

    Raises :class:`ConfigError` for a bad choice (``parallel.schedule=gpipe``).
    """
    overrides = list(overrides or [])
    errors = override_errors(overrides)
    if errors:
        raise ConfigError(errors)
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def job_run_dir(cfg: DictConfig) -> str:
    """The folder this Hydra job runs in. In a multirun that is Hydra's folder
    of the job (``hydra.sweep.dir``/``hydra.sweep.subdir``; by default
    ``<run_dir>/<job number>``), so the jobs of a sweep never share
    checkpoints; ``cfg.run_dir`` is set to it. Otherwise ``run_dir``, which
    is also Hydra's ``hydra.run.dir``."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    return cfg.run_dir


def run_app(app: Callable[[], None]) -> None:
    """A command's entry point: bad choices and unknown keys on the command
    line in one line each (exit 2) before Hydra composes, then the Hydra ``app``."""
    errors = override_errors(sys.argv[1:])
    if errors:
        print(ConfigError(errors), file=sys.stderr)
        sys.exit(2)
    register_configs()
    app()

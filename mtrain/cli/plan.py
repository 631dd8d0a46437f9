"""``mtrain-plan``: print the plan of a config without training.

    mtrain-plan parallel.pp=4 parallel.schedule=dualpipev output=json

Exit status 2 when the config is invalid.
"""
from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from mtrain.config.schema import register_configs
from mtrain.plan import format_plan, make_plan


@hydra.main(config_path="pkg://mtrain.configs", config_name="plan", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    plan = make_plan(cfg)
    if cfg.output == "json":
        print(json.dumps(plan))
    elif plan["errors"]:
        print(format_plan(plan), file=sys.stderr)
    else:
        print(format_plan(plan))
    if plan["errors"]:
        sys.exit(2)


def main() -> None:
    register_configs()
    _app()


if __name__ == "__main__":
    main()

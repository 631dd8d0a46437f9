"""``mtrain-plan``: print the plan of a config without training.

    mtrain-plan parallel.pp=4 parallel.schedule=dualpipev output=json

Exit status 2 when the config is invalid (a bad choice such as
``parallel.schedule=gpipe`` is reported on stderr even with ``output=json``).
"""
from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from mtrain.config.loading import run_app
from mtrain.cli.planning import format_plan, make_plan


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
    run_app(_app)


if __name__ == "__main__":
    main()

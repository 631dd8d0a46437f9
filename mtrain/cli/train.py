"""``mtrain-train``: the Hydra trainer.

Locally, one process per rank under torchrun::

    torchrun --standalone --nproc-per-node 4 -m mtrain.cli.train parallel.schedule=dualpipe

On Slurm, one task per rank under srun (the rank and master come from Slurm's
variables). Everything of a run goes under ``run_dir``.
"""
from __future__ import annotations

import sys

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from mtrain.config.loading import override_errors
from mtrain.config.schema import register_configs
from mtrain.config.validate import ConfigError


@hydra.main(config_path="pkg://mtrain.configs", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> int:
    # Imported here, after Hydra has set up logging: loggers created before it are disabled.
    from mtrain.launch.requeue import requeue_if_warned
    from mtrain.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, cfg.run_dir)
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    try:
        code = trainer.run()
        if trainer.stopped_early:  # every rank: requeue after Slurm's time-limit warning
            requeue_if_warned(trainer.stop_signal)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Returning (not sys.exit(0)) lets a Hydra launcher such as submitit record the result.
    if code:
        sys.exit(code)


def main() -> None:
    # A bad choice fails Hydra's composition with a multi-line report; say it in one line first.
    errors = override_errors(sys.argv[1:])
    if errors:
        print(ConfigError(errors), file=sys.stderr)
        sys.exit(2)
    register_configs()
    _app()


if __name__ == "__main__":
    main()

"""``mtrain-train``: the Hydra trainer.

Locally, one process per rank under torchrun::

    torchrun --standalone --nproc-per-node 4 -m mtrain.cli.train parallel.schedule=dualpipe

On Slurm, one task per rank under srun (the rank and master come from Slurm's
variables). Everything of a run goes under ``run_dir``; in a multirun (``-m``)
under ``<run_dir>/<job number>``, Hydra's folder of the job.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mtrain.config.loading import run_app


@hydra.main(config_path="pkg://mtrain.configs", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> int:
    # Imported here: the trainer and what it pulls in are not needed to compose the config.
    from mtrain.cli.failures import reporting_failures

    with reporting_failures():
        code = _train(cfg)
    # Returning (not sys.exit(0)) lets a Hydra launcher such as submitit record the result.
    if code:
        sys.exit(code)


def _train(cfg: DictConfig) -> int:
    from mtrain.config.loading import job_run_dir
    from mtrain.launch.requeue import requeue_if_warned
    from mtrain.train.trainer import Trainer

    trainer = Trainer(cfg, job_run_dir(cfg))  # a sweep's job: its own folder
    code = trainer.run()
    if trainer.stopped_early:  # every rank: requeue after Slurm's time-limit warning
        requeue_if_warned(trainer.stop_signal)
    return code


def main() -> None:
    run_app(_app)


if __name__ == "__main__":
    main()

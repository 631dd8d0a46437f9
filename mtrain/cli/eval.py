"""``mtrain-eval``: the held-out loss of a checkpoint, at any layout.

The same Hydra config tree as ``mtrain-train``; the model weights come from
``checkpoint.resume`` (a checkpoint directory, or ``latest`` of the run's
checkpoints) and reshard to the layout launched::

    torchrun --standalone --nproc-per-node 2 -m mtrain.cli.eval \\
        checkpoint.resume=runs/x/checkpoints/step_000200 parallel.pp=2 eval.split=98/1/1

Use the run's ``data`` and ``eval.split`` (or ``eval.path``) so the held-out set
is the one training held out. Rank 0 prints the evaluation's line, appends
the record to ``<run_dir>/eval.jsonl`` and prints it as JSON with ``output=json``.
Nothing of the checkpoint is changed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mtrain.config.loading import run_app


def run_eval(cfg, run_dir) -> dict:
    """Evaluate on every rank; rank 0 reports. Returns the record."""
    from mtrain.train.reporting import eval_json, eval_status_line
    from mtrain.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir)
    bar = None
    if trainer.rank == 0 and cfg.logging.progress and sys.stderr.isatty() and trainer.evaluator is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(trainer.evaluator.batches), unit="batch", desc="eval", file=sys.stderr)
    try:
        record = eval_json(trainer.evaluate_checkpoint(bar.update if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()
    if trainer.rank == 0:
        with open(Path(run_dir) / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record) if cfg.output == "json" else eval_status_line(record), flush=True)
    return record


@hydra.main(config_path="pkg://mtrain.configs", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from mtrain.cli.failures import reporting_failures

    with reporting_failures():
        run_eval(cfg, cfg.run_dir)


def main() -> None:
    run_app(_app)


if __name__ == "__main__":
    main()

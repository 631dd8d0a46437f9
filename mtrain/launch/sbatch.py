"""``mtrain-sbatch``: write (and optionally submit) a plain Slurm batch script
for a training run, from the same config tree and the same Slurm options
(configs/hydra/launcher/slurm.yaml) as ``mtrain-train -m hydra/launcher=slurm``::

    mtrain-sbatch cluster.nodes=4 cluster.gpus_per_node=8 hydra.launcher.partition=gpu \\
        parallel.pp=4 --out job.sbatch
    mtrain-sbatch cluster.nodes=4 ... --submit

The script runs one srun task per rank (nodes x cluster.gpus_per_node); each
task runs ``python -m mtrain.cli.train <the same overrides>``. It asks for
SIGUSR1 ``signal_delay_s`` before the time limit and is requeueable: the
trainer checkpoints on the signal and requeues the job, and the requeued job
runs the same script, which resumes from the checkpoint.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from mtrain.config.loading import CONFIG_MODULE, override_errors
from mtrain.config.schema import register_configs
from mtrain.config.validate import ConfigError

# launcher key -> sbatch option, for the keys that map one to one.
DIRECT_OPTIONS = {
    "name": "job-name",
    "nodes": "nodes",
    "tasks_per_node": "ntasks-per-node",
    "gpus_per_node": "gpus-per-node",
    "cpus_per_task": "cpus-per-task",
    "timeout_min": "time",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "exclude": "exclude",
    "gres": "gres",
    "comment": "comment",
    "exclusive": "exclusive",
    "mail_user": "mail-user",
    "mail_type": "mail-type",
}


def compose_with_launcher(overrides: Sequence[str]) -> DictConfig:
    """The full config (``hydra`` node included) with the Slurm launcher chosen."""
    register_configs()
    chosen = [o for o in overrides if o.startswith("hydra/launcher=")]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="config", overrides=([] if chosen else ["hydra/launcher=slurm"]) + list(overrides),
                       return_hydra_config=True)


def sbatch_options(launcher: Mapping[str, Any]) -> dict[str, Any]:
    """sbatch long options (without ``--``) from the launcher config; a value
    of True is a bare flag, None/False leave the option out."""
    options: dict[str, Any] = {}
    for key, option in DIRECT_OPTIONS.items():
        options[option] = launcher.get(key)
    if launcher.get("mem_gb"):
        options["mem"] = f"{launcher['mem_gb']}G"
    for key, value in (launcher.get("additional_parameters") or {}).items():
        options[key.replace("_", "-")] = value
    return {k: v for k, v in options.items() if v is not None and v is not False}


def sbatch_line(option: str, value: Any) -> str:
    return f"#SBATCH --{option}" if value is True else f"#SBATCH --{option}={shlex.quote(str(value))}"


def render_script(options: Mapping[str, Any], train_overrides: Sequence[str], log_dir: Path,
                  setup: Sequence[str] = (), python: str = sys.executable) -> str:
    lines = ["#!/bin/bash", "# Written by mtrain-sbatch; submit with: sbatch <this file>"]
    lines += [sbatch_line(k, v) for k, v in options.items()]
    # append: a requeued job writes on after its earlier attempts.
    lines += [sbatch_line("output", str(log_dir / "%x-%j.out")), sbatch_line("open-mode", "append"), ""]
    lines += [
        "set -euo pipefail",
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date)"',
        *setup,
        # One task per rank; rank, world size and master come from Slurm's
        # variables. A failing rank ends the step instead of leaving the rest
        # waiting on a collective.
        "srun --kill-on-bad-exit=1 " + shlex.join([python, "-u", "-m", "mtrain.cli.train", *train_overrides]),
        "",
    ]
    return "\n".join(lines)


def script_for(overrides: Sequence[str], log_dir: Path) -> str:
    cfg = compose_with_launcher(overrides)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    # As typed: interpolations such as ${train.lr} resolve in the job.
    train_overrides = OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)
    return render_script(sbatch_options(launcher), train_overrides, log_dir, setup=launcher.get("setup") or [])


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True).stdout
    match = re.match(r"\s*(\d+)", out)
    if not match:
        raise RuntimeError(f"unexpected sbatch output: {out!r}")
    return match.group(1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="mtrain-sbatch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for mtrain-train")
    parser.add_argument("--out", type=Path, default=Path("mtrain.sbatch"), help="batch script to write")
    parser.add_argument("--log-dir", type=Path, default=Path("logs/slurm"),
                        help="folder of the job's output file <name>-<job id>.out")
    parser.add_argument("--submit", action="store_true", help="also sbatch the script and print the job id")
    args = parser.parse_args(argv)
    errors = override_errors(args.overrides)
    if errors:  # before composing, which would fail with a traceback
        print(ConfigError(errors), file=sys.stderr)
        sys.exit(2)

    log_dir = args.log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create it
    text = script_for(args.overrides, log_dir)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    if args.submit:
        job_id = submit(args.out)
        name = re.search(r"--job-name=(\S+)", text)
        log_file = log_dir / f"{name.group(1) if name else 'sbatch'}-{job_id}.out"
        print(f"submitted Slurm job {job_id}: log {log_file}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train through random faults and check nothing was lost.

  python tools/chaos_run.py --steps 60 --nproc 4 --faults 6 --seed 7

First an uninterrupted reference run, then the same run again in another
directory while faults are injected at random steps, each followed by a
restart of the same command (which resumes from the newest checkpoint that
verifies), until the run completes. The faults:

- ``kill9``: SIGKILL to one random rank (torchrun then stops the others);
- ``term``: SIGTERM to every rank (a preemption: checkpoint, exit 0);
- ``flip``: after a ``term``, 4 KiB of the newest checkpoint's largest data
  file overwritten (same size): the restart must set it aside and resume
  from the previous one;
- ``stop``: SIGSTOP to one random rank until the others' collectives time out
  (``train.collective_timeout_s``); slow, so only with ``--with-stop``.

At the end the chaos run's ``metrics.jsonl`` must equal the reference's step
for step (losses bit-identical: a resume at the same world size is exact),
and every fault is counted as injected and survived. The seed is printed, so
a failure replays.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

FAULTS = ("kill9", "term", "flip")
BASE = ["logging.wandb=false", "logging.progress=false", "model.num_layers=4", "train.micro_batch_size=1",
        "data.seq_len=32", "checkpoint.keep_last=3", "train.collective_timeout_s=30"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--faults", type=int, default=6)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--interval", type=int, default=5, help="checkpoint.interval")
    p.add_argument("--with-stop", action="store_true", help="also SIGSTOP a rank (waits out a collective timeout)")
    p.add_argument("--dir", type=Path, default=Path("runs/chaos"))
    p.add_argument("overrides", nargs="*", help="extra overrides for mtrain-train")
    return p.parse_args(argv)


def launch(run_dir: Path, nproc: int, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "mtrain.cli.train", *BASE, *overrides, f"run_dir={run_dir}"]
    log = open(run_dir.parent / f"{run_dir.name}.console.log", "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def ranks_of(launcher: subprocess.Popen) -> list[int]:
    """The rank processes torchrun started (its children)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher.pid:
            children.append(int(stat.parent.name))
    return children


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()
             if line.strip() and '"kind"' not in line]
    return max(steps, default=0)


def wait_for_step(run: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300.0) -> bool:
    """Until the run logged ``step`` (True) or ended (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if steps_done(run_dir) >= step:
            return True
        if run.poll() is not None:
            return False
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir}: step {step} not reached in {timeout:.0f} s")


def flip_newest_checkpoint(run_dir: Path, rng: random.Random) -> str:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    files = sorted((run_dir / "checkpoints" / latest).glob("*.distcp"), key=lambda f: f.stat().st_size)
    target = files[-1]
    data = bytearray(target.read_bytes())
    at = rng.randrange(0, max(len(data) - 4096, 1))
    data[at:at + 4096] = bytes(rng.randrange(256) for _ in range(min(4096, len(data) - at)))
    target.write_bytes(bytes(data))
    return f"{target.relative_to(run_dir)} at byte {at}"


def run_to_end(run_dir: Path, nproc: int, overrides: list[str]) -> int:
    return launch(run_dir, nproc, overrides).wait()


def chaos(root: Path, steps: int, nproc: int, faults: int, seed: int, interval: int = 5,
          with_stop: bool = False, overrides: list[str] | None = None, kinds_in_order: list[str] | None = None) -> dict:
    """Run the reference and the chaos run; returns the report (raises on a lost step).
    ``kinds_in_order``: the faults to inject, in order (default: drawn at random)."""
    rng = random.Random(seed)
    overrides = [f"train.steps={steps}", f"checkpoint.interval={interval}", *(overrides or [])]
    root.mkdir(parents=True, exist_ok=True)
    reference, chaotic = root / "reference", root / "chaos"
    if run_to_end(reference, nproc, overrides) != 0:
        raise RuntimeError(f"the reference run failed; see {root}/reference.console.log")
    kinds = list(FAULTS) + (["stop"] if with_stop else [])
    kinds_in_order = list(kinds_in_order or [])
    injected, survived, restarts = [], 0, 0
    pending_flip = False
    while True:
        run = launch(chaotic, nproc, overrides)
        restarts += 1
        if len(injected) < faults:
            kind = kinds_in_order.pop(0) if kinds_in_order else rng.choice(kinds)
            if kind == "flip" and not pending_flip:
                pending_flip, kind = True, "term"  # a flip follows a clean stop, on its newest checkpoint
            at = min(steps - 1, steps_done(chaotic) + rng.randint(1, max(2, steps // faults)))
            if wait_for_step(run, chaotic, at):
                ranks = ranks_of(run)
                if kind == "kill9":
                    os.kill(rng.choice(ranks), signal.SIGKILL)
                elif kind == "term":
                    for pid in ranks:
                        os.kill(pid, signal.SIGTERM)
                elif kind == "stop":
                    os.kill(rng.choice(ranks), signal.SIGSTOP)
                injected.append(f"{kind} at step {at}")
                print(f"[chaos seed={seed}] injected {injected[-1]}", flush=True)
            code = run.wait()
            if pending_flip and injected and injected[-1].startswith("term") and (chaotic / "checkpoints" / "latest").exists():
                where = flip_newest_checkpoint(chaotic, rng)
                injected.append(f"flip of {where}")
                print(f"[chaos seed={seed}] injected {injected[-1]}", flush=True)
                pending_flip = False
            if code == 0 and steps_done(chaotic) >= steps:
                break
            continue
        if run.wait() == 0 and steps_done(chaotic) >= steps:
            break
    survived = len(injected)
    ref = _losses(reference)
    got = _losses(chaotic)
    if got != ref:
        lost = [s for s in ref if got.get(s) != ref[s]]
        raise AssertionError(f"seed {seed}: steps {lost[:10]} differ from the uninterrupted run")
    report = {"seed": seed, "steps": steps, "faults_injected": len(injected), "faults_survived": survived,
              "restarts": restarts, "faults": injected,
              "set_aside": sorted(p.name for p in (chaotic / "checkpoints").iterdir() if "." in p.name)}
    print(f"[chaos seed={seed}] {len(injected)} faults injected, {survived} survived, {restarts} launches; "
          f"metrics.jsonl equal to the uninterrupted run's for all {steps} steps", flush=True)
    return report


def _losses(run_dir: Path) -> dict[int, tuple]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "kind" not in record:
            out[record["step"]] = (record["loss"], record["lm_loss"], record.get("grad_norm"))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"[chaos] seed {seed}", flush=True)
    report = chaos(args.dir, args.steps, args.nproc, args.faults, seed, args.interval, args.with_stop,
                   args.overrides)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

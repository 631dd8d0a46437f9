#!/usr/bin/env python
"""Train through random faults and check nothing was lost.

  python tools/chaos_run.py --steps 60 --nproc 4 --faults 6 --seed 7

First an uninterrupted reference run, then the same run again in another
directory while faults are injected at random steps, each followed by a
restart of the same command (which resumes from the newest checkpoint that
verifies), until the run completes. The faults:

- ``kill9``: SIGKILL to one random rank (torchrun then stops the others);
- ``term``: SIGTERM to every rank (a preemption: checkpoint, exit 0);
- ``flip``: after a ``term`` that leaves an older checkpoint to fall back to
  (else after the next one), 4 KiB of the newest checkpoint's largest data
  file overwritten (same size): the restart must set it aside and resume
  from the previous one;
- ``stop``: SIGSTOP to one random rank, after the launch's first steps (the
  collective timeout is then sized to the steps) and between checkpoints;
  the others' watchdogs must name it, then their collectives time out; once
  one has exited, the frozen rank is killed (as torchrun would after its
  30 s grace). Only with ``--with-stop`` (each costs a timeout, about 30 s
  here).

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

from mtrain.parallel.groups import TIMEOUT_WARMUP
from mtrain.train.checkpoint_files import step_of

FAULTS = ("kill9", "term", "flip")
# The collective timeout is sized to these tiny steps (collective_timeout_s=null): a floor of 10 s,
# and the watchdog's fixed 10 s budget + 15 s, so a stopped rank costs about 25 s and is named first.
BASE = ["logging.wandb=false", "logging.progress=false", "model.num_layers=4", "train.micro_batch_size=1",
        "data.seq_len=32", "checkpoint.keep_last=3", "train.watchdog_s=10", "train.collective_timeout_floor_s=10"]


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
    args = p.parse_args(argv)
    if args.with_stop and args.interval < 4:
        p.error(f"--with-stop needs --interval of at least 4 (got {args.interval}): a rank is stopped two steps "
                f"clear of a checkpoint, where the collective timeout is sized to the steps")
    return args


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


def rank_of(pid: int) -> int:
    """The RANK torchrun gave process ``pid``."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def resume_step(run_dir: Path) -> int:
    """The step a launch resumes from (at most): the newest checkpoint's."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    return step_of(latest.read_text().strip()) or 0


def stop_step(run_dir: Path, at: int, steps: int, interval: int) -> int | None:
    """The step after which to stop a rank, no earlier than ``at``: once the
    launch has sized its collective timeout (its warm-up steps and one more
    done), and with two steps before the next checkpoint (a long operation,
    under the generous timeout) or the end of the run. None: no such step left."""
    at = max(at, resume_step(run_dir) + TIMEOUT_WARMUP + 2)
    while at % interval == 0 or interval - at % interval < 3:
        at += 1
    return at if at <= steps - 3 else None


def log_sizes(run_dir: Path, nproc: int) -> list[int]:
    logs = [run_dir / "logs" / f"rank{r}.log" for r in range(nproc)]
    return [f.stat().st_size if f.exists() else 0 for f in logs]


def stop_a_rank(run_dir: Path, pids: list[int], pid: int, nproc: int, timeout: float = 120.0) -> dict:
    """SIGSTOP ``pid`` until another rank has given up on it (its collective
    timed out), then kill it, as torchrun would after its 30 s grace. If none
    gives up within ``timeout`` s the stop landed where the timeout is the
    generous one (a checkpoint): the rank is continued instead. Returns its
    rank, the ranks whose logs named it as stopped, and whether it was continued."""
    rank, before = rank_of(pid), log_sizes(run_dir, nproc)
    os.kill(pid, signal.SIGSTOP)
    others = [p for p in pids if p != pid]
    end = time.monotonic() + timeout
    while all(alive(p) for p in others) and time.monotonic() < end:
        time.sleep(0.5)
    continued = all(alive(p) for p in others)
    try:
        os.kill(pid, signal.SIGCONT if continued else signal.SIGKILL)
    except ProcessLookupError:
        pass  # torchrun was quicker
    named = []
    for r, offset in enumerate(before):
        path = run_dir / "logs" / f"rank{r}.log"
        if r != rank and path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                if f"ranks gone silent: {rank} (".encode() in f.read():
                    named.append(r)
    return {"rank": rank, "named_by": named, "continued": continued}


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()
             if line.strip() and '"kind"' not in line]
    return max(steps, default=0)


def wait_for_step(run: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300.0,
                  poll_s: float = 0.2) -> bool:
    """Until the run logged ``step`` (True) or ended (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if steps_done(run_dir) >= step:
            return True
        if run.poll() is not None:
            return False
        time.sleep(poll_s)
    raise TimeoutError(f"{run_dir}: step {step} not reached in {timeout:.0f} s")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints not set aside nor half-written (``step_<n>`` only)."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None) if root.exists() else []


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
    injected, survived, restarts, stops = [], 0, 0, []
    pending_flip, failed_in_a_row = False, 0
    while True:
        run = launch(chaotic, nproc, overrides)
        restarts += 1
        before = len(injected)
        if len(injected) < faults:
            kind = kinds_in_order.pop(0) if kinds_in_order else rng.choice(kinds)
            if kind == "flip":
                pending_flip, kind = True, "term"  # a flip follows a clean stop, on its newest checkpoint
            at = min(steps - 1, steps_done(chaotic) + rng.randint(1, max(2, steps // faults)))
            if kind == "stop":
                at_stop = stop_step(chaotic, at, steps, interval)
                if at_stop is None:
                    print(f"[chaos seed={seed}] no room left for a stop after step {at}: a kill9 instead", flush=True)
                    kind = "kill9"
                else:
                    at = at_stop
            # A stop must land in the next step, before the checkpoint after it: these steps take ~50 ms here.
            if wait_for_step(run, chaotic, at, poll_s=0.005 if kind == "stop" else 0.2):
                ranks = ranks_of(run)
                if kind == "kill9":
                    os.kill(rng.choice(ranks), signal.SIGKILL)
                elif kind == "term":
                    for pid in ranks:
                        os.kill(pid, signal.SIGTERM)
                elif kind == "stop":
                    stop = stop_a_rank(chaotic, ranks, rng.choice(ranks), nproc)
                    stops.append({**stop, "after_step": at})
                    kind = (f"stop of rank {stop['rank']} (named by ranks {stop['named_by']}"
                            f"{'; landed in a checkpoint, continued' if stop['continued'] else ''})")
                injected.append(f"{kind} at step {at}")
                print(f"[chaos seed={seed}] injected {injected[-1]}", flush=True)
            code = run.wait()
            # Only with an older checkpoint to fall back to: the restart refuses to start over otherwise.
            if pending_flip and len(injected) > before and injected[-1].startswith("term") \
                    and len(complete_checkpoints(chaotic)) >= 2:
                where = flip_newest_checkpoint(chaotic, rng)
                injected.append(f"flip of {where}")
                print(f"[chaos seed={seed}] injected {injected[-1]}", flush=True)
                pending_flip = False
        else:
            code = run.wait()
        if code == 0 and steps_done(chaotic) >= steps:
            break
        failed_in_a_row = failed_in_a_row + 1 if code != 0 and len(injected) == before else 0
        if failed_in_a_row == 3:
            raise RuntimeError(f"seed {seed}: 3 launches in a row failed with no fault injected; "
                               f"see {root}/chaos.console.log")
    survived = len(injected)
    ref = _losses(reference)
    got = _losses(chaotic)
    if got != ref:
        lost = [s for s in ref if got.get(s) != ref[s]]
        raise AssertionError(f"seed {seed}: steps {lost[:10]} differ from the uninterrupted run")
    report = {"seed": seed, "steps": steps, "faults_injected": len(injected), "faults_survived": survived,
              "restarts": restarts, "faults": injected, "stops": stops,
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

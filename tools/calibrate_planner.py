#!/usr/bin/env python
"""How close the planner's model of a schedule is to the real step.

    python tools/calibrate_planner.py --nproc 4 --microbatches 8

For pp in {2, 4} and every schedule, trains the tiny model a few steps on
CPU ranks with ``logging.trace_step`` set, reads the recorded step's op
costs back from its trace (``mtrain.planner.calibrate``) and simulates the
schedule with them, then prints the simulated pipeline time next to the
measured one (and the whole measured step, which adds the gradient sync and
the optimizer). The ratio says how well the simulator's dependencies and
op ordering describe what the executor did, with the costs right; the
roofline estimates are the other half of a prediction (docs/planning.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES, num_model_stages
from mtrain.planner.calibrate import compare

BASE = ["logging.wandb=false", "logging.progress=false", "model.num_layers=8", "data.seq_len=64",
        "train.micro_batch_size=2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULE_NAMES))
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--step", type=int, default=3, help="the step traced (the first ones warm up)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def traced_run(run_dir: Path, nproc: int, pp: int, schedule: str, microbatches: int, step: int) -> Path:
    ep = max(1, nproc // pp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "mtrain.cli.train", *BASE, f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.schedule={schedule}",
           f"parallel.num_microbatches={microbatches}", f"train.steps={step}", f"logging.trace_step={step}",
           f"run_dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(f"{schedule} pp={pp} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return run_dir / "trace" / f"step_{step:06d}.json"


def step_time(run_dir: Path, step: int) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == step and "step_time_s" in record:
            return record["step_time_s"]
    raise SystemExit(f"{run_dir}/metrics.jsonl has no step {step}")


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pp in args.pp:
            for schedule in args.schedules:
                print(f"tracing {schedule} pp={pp} ...", file=sys.stderr, flush=True)
                run_dir = Path(tmp) / f"{schedule}-pp{pp}"
                trace = traced_run(run_dir, args.nproc, pp, schedule, args.microbatches, args.step)
                result = compare(trace, schedule, pp, args.microbatches, num_model_stages(schedule, pp))
                result.pop("costs")
                result["step_s"] = step_time(run_dir, args.step)
                rows.append(result)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"tiny model, {args.nproc} CPU ranks, {args.microbatches} micro-batches, step {args.step} traced")
    print("| schedule | pp | measured pipeline ms | simulated with measured op costs ms | ratio | whole step ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['pp']} | {1e3 * r['measured_s']:.1f} | {1e3 * r['predicted_s']:.1f} | "
              f"{r['ratio']:.3f} | {1e3 * r['step_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

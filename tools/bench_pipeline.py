#!/usr/bin/env python
"""Run one pipeline layout through every schedule and compare the measured
step with the simulator's prediction.

  python tools/bench_pipeline.py --synthetic --pp 4 --microbatches 8 --cost F=20,B=40,W=20,FB=60
  python tools/bench_pipeline.py --model tiny --pp 2 --microbatches 4

``--synthetic``: every stage is a :class:`~mtrain.testing.toy.SleepChunk` that
sleeps (``--busy``: spins) ``F`` ms forward, ``B - W`` ms for the input gradient
and ``W`` ms for the weight gradient; when ``FB < F + B`` each chunk gets an
exchange (a timer) of ``F + B - FB`` ms in all, split between forward and
backward in proportion to F and B, that an overlapped pair hides behind the
other side's compute. DualPipeV cuts the model into ``2pp`` stages, so its
stages get half the costs (same model as the other rows). Sleeping makes the
comparison independent of the number of cores. torch's ``Schedule1F1B`` and
``ScheduleDualPipeV`` run the same sleeping stages as peers.

``--model NAME``: the real model (``mtrain.pipeline.stages.build_chunks``), config
``model=NAME``, one pipeline, on gloo.

Printed: per schedule the step time (median of ``--steps`` after one warm-up),
tokens/s, the bubble (total idle / (pp x makespan)) measured and simulated
with the op costs measured in the run (mean F, B, W, FB), and the peak memory
growth per rank during the step (RSS high-water mark on CPU,
``max_memory_allocated`` on CUDA); then per rank the idle time measured and
simulated. ``--trace-dir`` writes each schedule's merged Chrome trace and a
PNG of the measured timeline.

Ranks are forked from this process (``mtrain.testing.run_distributed``), so
one command runs the whole benchmark.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from mtrain.pipeline.executor import PipelineExecutor, expected_chunk_keys
from mtrain.pipeline.instructions import Overlap, dependencies, done_key
from mtrain.pipeline.render import render_timeline
from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES, num_model_stages, schedule_errors
from mtrain.pipeline.simulate import simulate
from mtrain.testing.memory import peak_memory, reset_peak_memory
from mtrain.testing.toy import SleepChunk, sleep_ms
from mtrain.pipeline.trace import idle_per_rank, makespan, to_timelines, write_chrome_trace
from mtrain.testing import run_distributed


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Rank workers
# ---------------------------------------------------------------------------

def split_costs(costs: dict[str, float], scale: float) -> dict:
    """SleepChunk arguments for per-stage ``costs`` scaled by ``scale``."""
    c = {k: v * scale for k, v in costs.items()}
    hidden_comm = c["F"] + c["B"] - c["FB"]
    if hidden_comm < 0:
        raise ValueError(f"FB={costs['FB']} above F+B: an overlapped pair cannot cost more than running both")
    return dict(F_ms=c["F"], B_ms=c["B"], W_ms=c["W"], fwd_comm_ms=hidden_comm * c["F"] / (c["F"] + c["B"]),
                bwd_comm_ms=hidden_comm * c["B"] / (c["F"] + c["B"]))


def _timed_steps(step, steps: int) -> list[dict]:
    """One warm-up step, then ``steps`` measured ones, each after a barrier."""
    step()
    out = []
    for _ in range(steps):
        dist.barrier()
        base = reset_peak_memory()
        t0 = time.perf_counter()
        result = step()
        wall = time.perf_counter() - t0
        peak = peak_memory()
        out.append({"wall": wall, "result": result,
                    "peak_mib": None if peak is None or base is None else peak - base})
    return out


def _run_executor(schedule: str, pp: int, n: int, chunks: dict, batches: list[dict], steps: int) -> list[dict]:
    rank = dist.get_rank()
    executor = PipelineExecutor(schedule, pp, rank, n, chunks, list(range(pp)), overlap=True, trace=True)
    return _timed_steps(lambda: executor.step(batches), steps)


def synthetic_worker(schedule: str, pp: int, n: int, costs: dict, shape: tuple, busy: bool, steps: int):
    rank = dist.get_rank()
    mbs, seq, hidden = shape
    num_stages = num_model_stages(schedule, pp)
    kwargs = split_costs(costs, 0.5 if schedule == "dualpipev" else 1.0)
    chunks = {key: SleepChunk(key[0], num_stages, hidden=hidden, busy=busy, **kwargs)
              for key in expected_chunk_keys(schedule, pp, rank)}
    ids = torch.zeros(mbs, seq, dtype=torch.long)
    return _run_executor(schedule, pp, n, chunks, [{"input_ids": ids, "labels": ids}] * n, steps)


def model_worker(schedule: str, pp: int, n: int, model: str, steps: int):
    from mtrain.config.loading import load_config
    from mtrain.pipeline.stages import build_chunks
    from mtrain.parallel.groups import create_groups
    from mtrain.parallel.layout import build_layout
    from mtrain.pipeline.schedule_rules import copy_groups

    cfg = load_config([f"model={model}", "parallel.ep=1", f"parallel.pp={pp}", f"parallel.schedule={schedule}",
                       f"parallel.num_microbatches={n}", "parallel.dispatcher=local"])
    groups = create_groups(build_layout(pp, pp=pp, stage_copies=copy_groups(schedule, pp)))
    chunks = build_chunks(cfg, groups, pp_rank=dist.get_rank())
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    batches = [{"input_ids": torch.randint(cfg.model.vocab_size, shape, generator=g),
                "labels": torch.randint(cfg.model.vocab_size, shape, generator=g)} for _ in range(n)]
    return _run_executor(schedule, pp, n, chunks, batches, steps)


class _PeerSleep(torch.autograd.Function):
    """Identity that sleeps ``fwd_ms`` forward and ``input_ms`` backward."""

    @staticmethod
    def forward(ctx, x, fwd_ms, input_ms, busy):
        ctx.input_ms, ctx.busy = input_ms, busy
        sleep_ms(fwd_ms, busy)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        sleep_ms(ctx.input_ms, ctx.busy)
        return grad, None, None, None


class _WeightSleep(torch.autograd.Function):
    """Zeros in forward; the backward (a weight-only branch, which torch's
    zero-bubble schedules run as the W step) sleeps ``weight_ms``."""

    @staticmethod
    def forward(ctx, weight, weight_ms, busy):
        ctx.weight_ms, ctx.busy = weight_ms, busy
        return torch.zeros_like(weight)

    @staticmethod
    def backward(ctx, grad):
        sleep_ms(ctx.weight_ms, ctx.busy)
        return torch.zeros_like(grad), None, None


class SleepModule(nn.Module):
    def __init__(self, hidden: int, F_ms: float, B_ms: float, W_ms: float, busy: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))
        self.F_ms, self.I_ms, self.W_ms, self.busy = F_ms, B_ms - W_ms, W_ms, busy

    def forward(self, x):
        y = _PeerSleep.apply(x, self.F_ms, self.I_ms, self.busy)
        return y + _WeightSleep.apply(self.weight, self.W_ms, self.busy)


def torch_peer_worker(kind: str, pp: int, n: int, costs: dict, shape: tuple, busy: bool, steps: int):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    rank = dist.get_rank()
    mbs, seq, hidden = shape
    if kind == "1f1b":
        stage_ids, num_stages, scale = [rank], pp, 1.0
    else:
        stage_ids, num_stages, scale = [rank, 2 * pp - 1 - rank], 2 * pp, 0.5
    stages = [PipelineStage(SleepModule(hidden, costs["F"] * scale, costs["B"] * scale, costs["W"] * scale, busy),
                            s, num_stages, torch.device("cpu"))
              for s in stage_ids]
    loss_fn = lambda out, target: out.mean()  # noqa: E731
    if kind == "1f1b":
        schedule = Schedule1F1B(stages[0], n, loss_fn=loss_fn)
    else:
        schedule = ScheduleDualPipeV(stages, n, loss_fn=loss_fn)
    # The input requires grad so that the first stage pays its input-gradient time too.
    x = torch.zeros(n * mbs, seq, hidden, requires_grad=True)
    holds = set(stage_ids)
    args = (x,) if 0 in holds else ()
    kwargs = {"target": x} if num_stages - 1 in holds else {}
    return [{"wall": r["wall"], "result": None, "peak_mib": r["peak_mib"]}
            for r in _timed_steps(lambda: schedule.step(*args, **kwargs), steps)]


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    step_s: float
    tokens_per_s: float
    peak_mib: list
    bubble_measured: Optional[float] = None
    bubble_simulated: Optional[float] = None
    idle_measured: Optional[list] = None
    idle_simulated: Optional[list] = None
    costs: Optional[dict] = None
    latency: Optional[float] = None


def measured_costs(traces) -> dict[str, float]:
    """Mean duration (ms) of each instruction kind over all ranks, as the
    simulator's F, B, W, FB (B = I + W where the run has no full B; FB = F + B
    where it has no overlapped pair)."""
    by_kind: dict[str, list[float]] = {}
    for t in traces:
        for op in t.ops:
            kind = "FB" if isinstance(op.instruction, Overlap) else op.instruction.kind
            by_kind.setdefault(kind, []).append(op.duration * 1e3)
    mean = {k: statistics.fmean(v) for k, v in by_kind.items()}
    w = mean.get("W", 0.0)
    c = {"F": mean["F"], "W": w, "B": mean["B"] if "B" in mean else mean["I"] + w}
    c["FB"] = mean.get("FB", c["F"] + c["B"])
    return c


def handoff_latency(schedule: str, pp: int, traces) -> float:
    """Median time (ms) from the end of an op on one rank to the start of a
    dependent op on another rank that was waiting for it: the cost of one
    hand-off (send posted, transferred, receive completed, receiver woken)."""
    done = {}
    for t in traces:
        for op in t.ops:
            for o in op.instruction.ops:
                done[done_key(o)] = (op.end, t.rank)
    samples = []
    for t in traces:
        for op in t.ops:
            if op.start <= op.wait_start:
                continue
            deps = [done[k] for o in op.instruction.ops for k in dependencies(schedule, pp, o) if k in done]
            end, src = max(deps, default=(None, t.rank))
            if src != t.rank and end is not None and end > op.wait_start:
                samples.append(max(op.start - end, 0.0) * 1e3)
    return statistics.median(samples) if samples else 0.0


def _median_step(per_rank: list[list[dict]]) -> int:
    spans = []
    for i in range(len(per_rank[0])):
        traces = [steps[i]["result"].trace for steps in per_rank]
        spans.append((makespan(traces), i))
    return sorted(spans)[len(spans) // 2][1]


def executor_row(schedule: str, per_rank: list[list[dict]], pp: int, n: int, tokens: int,
                 trace_dir: Optional[str]) -> Row:
    i = _median_step(per_rank)
    traces = [steps[i]["result"].trace for steps in per_rank]
    span = makespan(traces)
    idle = idle_per_rank(traces)
    costs = measured_costs(traces)
    latency = handoff_latency(schedule, pp, traces)
    sim = simulate(schedule, pp, n, costs, latency=latency)
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        write_chrome_trace(os.path.join(trace_dir, f"{schedule}.json"), traces)
        timelines = [[(ins, s * 1e3, e * 1e3) for ins, s, e in tl] for tl in to_timelines(traces)]
        render_timeline(timelines, os.path.join(trace_dir, f"{schedule}.png"), f"{schedule} measured (ms)")
    return Row(schedule, span, tokens / span, [steps[i]["peak_mib"] for steps in per_rank],
               bubble_measured=100 * sum(idle) / (pp * span), bubble_simulated=100 * sim.bubble_ratio,
               idle_measured=[x * 1e3 for x in idle], idle_simulated=[r.idle for r in sim.ranks], costs=costs,
               latency=latency)


def peer_row(name: str, per_rank: list[list[dict]], tokens: int) -> Row:
    walls = [max(steps[i]["wall"] for steps in per_rank) for i in range(len(per_rank[0]))]
    i = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]
    return Row(name, walls[i], tokens / walls[i], [steps[i]["peak_mib"] for steps in per_rank])


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(rows: list[Row], args) -> None:
    print(f"pp={args.pp} micro-batches={args.microbatches} "
          + (f"synthetic costs {args.cost} ms ({'busy loop' if args.busy else 'sleep'})" if args.synthetic
             else f"model={args.model}"))
    header = f"{'schedule':<18}{'step ms':>10}{'tokens/s':>11}{'bubble %':>10}{'sim %':>8}  peak MiB per rank"
    print(header)
    print("-" * len(header))
    for r in rows:
        peaks = " ".join(_fmt(p) for p in r.peak_mib)
        print(f"{r.name:<18}{r.step_s * 1e3:>10.1f}{r.tokens_per_s:>11.0f}{_fmt(r.bubble_measured):>10}"
              f"{_fmt(r.bubble_simulated):>8}  {peaks}")
    print()
    print("idle per rank (ms): measured / simulated with the measured costs and hand-off latency")
    for r in rows:
        if r.idle_measured is None:
            continue
        pairs = "  ".join(f"{m:.1f}/{s:.1f}" for m, s in zip(r.idle_measured, r.idle_simulated))
        costs = ",".join(f"{k}={v:.1f}" for k, v in r.costs.items())
        print(f"  {r.name:<10} {pairs}   (measured costs {costs}, hand-off latency {r.latency:.2f})")


def parse_costs(text: str) -> dict[str, float]:
    costs = {"F": 20.0, "B": 40.0, "W": 20.0}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in ("F", "B", "W", "FB"):
            raise argparse.ArgumentTypeError(f"unknown cost {name!r} in --cost; use F, B, W, FB")
        costs[name] = float(value)
    costs.setdefault("FB", costs["F"] + costs["B"])
    return costs


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--synthetic", action="store_true", help="sleeping stages with --cost")
    mode.add_argument("--model", help="real model, e.g. tiny (config model=NAME)")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--schedules", default=",".join(SCHEDULE_NAMES))
    parser.add_argument("--cost", default="F=20,B=40,W=20,FB=60", help="per-stage ms: F=..,B=..,W=..,FB=..")
    parser.add_argument("--busy", action="store_true", help="spin instead of sleeping (needs a core per rank)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up (median shown)")
    parser.add_argument("--shape", default="1,16,64", help="micro-batch size, sequence length, hidden (synthetic)")
    parser.add_argument("--no-peers", action="store_true", help="skip torch.distributed.pipelining peers")
    parser.add_argument("--trace-dir", help="write <schedule>.json (Chrome trace) and <schedule>.png here")
    parser.add_argument("--timeout", type=float, default=600.0)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        args.cost_values = parse_costs(args.cost)
    except (argparse.ArgumentTypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shape = tuple(int(x) for x in args.shape.split(","))
    pp, n = args.pp, args.microbatches
    tokens = n * shape[0] * shape[1]
    if args.model:
        try:
            from mtrain.config.loading import load_config
            from mtrain.pipeline.stages import build_chunks  # noqa: F401
        except ImportError as e:
            print(f"error: --model needs mtrain.pipeline.stages.build_chunks ({e})", file=sys.stderr)
            return 2
        cfg = load_config([f"model={args.model}"])
        tokens = n * cfg.train.micro_batch_size * cfg.data.seq_len
    rows = []
    for schedule in args.schedules.split(","):
        errors = schedule_errors(schedule, pp, n)
        if errors:
            print(f"skipping {schedule}: {'; '.join(errors)}")
            continue
        if args.synthetic:
            per_rank = run_distributed(synthetic_worker, pp, schedule, pp, n, args.cost_values, shape, args.busy,
                                       args.steps, timeout=args.timeout)
        else:
            per_rank = run_distributed(model_worker, pp, schedule, pp, n, args.model, args.steps,
                                       timeout=args.timeout)
        rows.append(executor_row(schedule, per_rank, pp, n, tokens, args.trace_dir))
    if args.synthetic and not args.no_peers:
        for kind, name in (("1f1b", "torch 1f1b"), ("dualpipev", "torch dualpipev")):
            if schedule_errors(kind, pp, n):
                continue
            per_rank = run_distributed(torch_peer_worker, pp, kind, pp, n, args.cost_values, shape, args.busy,
                                       args.steps, timeout=args.timeout)
            rows.append(peer_row(name, per_rank, tokens))
    print_report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

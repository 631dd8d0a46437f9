#!/usr/bin/env python
"""Training throughput and peak memory of one layout, per pipeline schedule,
next to torch.distributed.pipelining on the same model chunks.

  python tools/bench_train.py --ranks 4 --pp 2 --steps 10

Rows (one Markdown table, printed at the end):

- ``mtrain <schedule>, train step``: :class:`mtrain.train.trainer.Trainer`'s
  ``train_step`` -- data, forward and backward through the pipeline executor,
  gradient reduction over every replica group, gradient norm, clipping,
  ZeRO-1 AdamW and the router bias update.
- ``mtrain <schedule>, pipeline only``: the same trainer's executor step alone
  (gradients zeroed, forward + backward of every micro-batch, nothing else),
  on one fixed step of data, measured *before* any optimizer step.
- ``torch ScheduleDualPipeV`` / ``torch Schedule1F1B``: the peers, pipeline
  only. Each rank builds the same chunks (``build_chunks``: same weights,
  same dp/ep groups) for the DualPipeV (stages r and 2pp-1-r) or the 1F1B
  layout and wraps each in a ``PipelineStage`` module. The last stage's
  module passes its received hidden state through and the schedule's
  ``loss_fn`` runs that chunk (layers, head, MTP) on it, with the token ids
  and labels carried in ``target``; torch calls ``loss_fn`` inside the last
  stage's forward action, so the work per action is the same as mtrain's.
  The peers do no gradient reduction and no optimizer step: compare them with
  the "pipeline only" rows. torch's DualPipeV runs its overlapped F&B actions
  as F then B (no communication/compute overlap).

The ``loss`` column is the mean loss of the first pipeline step over every
micro-batch of every data-parallel replica; the pipeline-only rows and the
peers start from the same weights and data, so it must agree to round-off
(a check that the peers run the same model).

Timing: ``--warmup`` steps, then ``--steps`` measured steps, each after a
barrier; mtrain's two kinds of step alternate so that both see the same
machine load. A step's time is the slowest rank's, the table shows the
median. tokens/s = global batch tokens (micro-batch size x micro-batches x dp
x seq-len) / step time. Memory per rank, the largest over the measured steps:
"peak" is the resident set high-water mark on CPU (VmHWM, reset before each
step; it counts the interpreter and the pages shared with the parent process)
or ``max_memory_allocated`` on CUDA; "growth" is that peak minus the level at
the step's start (activations, gradients, optimizer temporaries).

Ranks are forked from this process (``mtrain.testing.run_distributed``, gloo),
so one command runs everything.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from mtrain.config.loading import load_config
from mtrain.pipeline.schedule_rules import schedule_errors
from mtrain.testing import run_distributed

MTRAIN_SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "zb1p")
PEERS = {"dualpipev": "torch ScheduleDualPipeV", "1f1b": "torch Schedule1F1B"}


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------

def _uses_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _status_mib(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_memory() -> Optional[float]:
    """Start a new peak measurement; returns the current level in MiB."""
    if _uses_cuda():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:  # Linux: writing 5 resets the RSS high-water mark (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_mib("VmRSS")


def peak_memory() -> Optional[float]:
    if _uses_cuda():
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


# ---------------------------------------------------------------------------
# Rank workers
# ---------------------------------------------------------------------------

def measure(step: Callable[[], object]) -> dict:
    """One step after a barrier: this rank's wall time, peak memory and growth."""
    dist.barrier()
    base = reset_peak_memory()
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    peak = peak_memory()
    return {"wall": wall, "peak": peak, "growth": None if peak is None or base is None else peak - base}


def summarize(samples: list[dict]) -> dict:
    def worst(key):
        values = [s[key] for s in samples if s[key] is not None]
        return max(values) if values else None
    return {"walls": [s["wall"] for s in samples], "peak_mib": worst("peak"), "growth_mib": worst("growth")}


def mtrain_worker(overrides: list[str], run_dir: str, warmup: int, steps: int) -> dict:
    from mtrain.train.trainer import Trainer

    cfg = load_config(overrides + [f"run_dir={run_dir}"])
    trainer = Trainer(cfg, run_dir)
    batches = [{"input_ids": x, "labels": y} for x, y in trainer.loader.next_step()]
    first: list = []

    def pipeline_step():
        trainer.optimizer.zero_grad()
        result = trainer.executor.step(batches)
        if not first:  # before any optimizer step: the weights the peers start from
            first.append(list(result.losses.values()))
    # Alternate the two kinds of step so that both see the same machine load.
    pipeline, train = [], []
    for i in range(warmup + steps):
        p, t = measure(pipeline_step), measure(trainer.train_step)
        if i >= warmup:
            pipeline.append(p)
            train.append(t)
    return {"pipeline": summarize(pipeline), "train": summarize(train), "losses": first[0]}


class PeerStage(nn.Module):
    """A :class:`~mtrain.model.model.ModelChunk` as a torch pipelining stage
    with a ``forward(x) -> hidden`` signature. The first stage takes token ids;
    a last stage returns its input unchanged and ``chunk_loss`` runs the chunk."""

    def __init__(self, chunk: nn.Module):
        super().__init__()
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk.is_last:
            return x
        if self.chunk.is_first:
            return self.chunk({"input_ids": x}).hidden
        # Middle stages only need the sequence shape (for the rotary tables).
        ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        return self.chunk({"input_ids": ids}, received=x).hidden


def chunk_loss(chunk: Optional[nn.Module]) -> Callable:
    """The schedule's loss_fn: the last chunk (``chunk``, None on ranks that
    hold none) on its received hidden state, ``target`` stacking the token ids
    and labels on the last dimension."""
    def loss_fn(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if chunk is None:
            raise RuntimeError("this rank holds no last stage and computes no loss")
        return chunk({"input_ids": target[..., 0], "labels": target[..., 1]}, received=hidden).loss
    return loss_fn


def torch_peer_worker(kind: str, overrides: list[str], warmup: int, steps: int) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    from mtrain.data.build import build_gpt_dataset
    from mtrain.data.gpt_dataset import StepLoader
    from mtrain.pipeline.stages import build_chunks
    from mtrain.parallel.groups import create_groups
    from mtrain.parallel.layout import build_layout
    from mtrain.pipeline.schedule_rules import copy_groups

    cfg = load_config(overrides + [f"parallel.schedule={kind}"])
    p = cfg.parallel
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = build_layout(world, p.tp, p.ep, p.expert_tp, p.pp, p.order, copy_groups(p.schedule, p.pp))
    groups = create_groups(layout)
    chunks = build_chunks(cfg, groups, layout.pp_rank(rank))
    # Example inputs and outputs make the stages static: torch's runtime shape
    # inference (metadata objects over the pp group) is not part of a step.
    mbs, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    hidden = torch.zeros(mbs, seq, cfg.model.hidden_size, requires_grad=True)  # received: needs a gradient
    stages = [PipelineStage(PeerStage(chunk), stage, 2 * p.pp if kind == "dualpipev" else p.pp, hidden.device,
                            input_args=torch.zeros(mbs, seq, dtype=torch.long) if chunk.is_first else hidden,
                            output_args=hidden, group=groups.group("pp"))
              for (stage, _), chunk in sorted(chunks.items())]
    last = [chunk for chunk in chunks.values() if chunk.is_last]
    # torch runs backwards only where a loss_fn is given: every rank needs one.
    loss_fn = chunk_loss(last[0] if last else None)
    n = p.num_microbatches
    if kind == "dualpipev":
        schedule = ScheduleDualPipeV(stages, n, loss_fn=loss_fn)
    else:
        schedule = Schedule1F1B(stages[0], n, loss_fn=loss_fn)
    # torch divides the gradients by n after the step (scale_grads), the
    # router's auxiliary-loss gradient included: its scale stays 1 (the default).

    loader = StepLoader(build_gpt_dataset(cfg.data, cfg.model.vocab_size), cfg.train.micro_batch_size, n,
                        groups.index("dp"), groups.size("dp"))
    samples = loader.next_step()
    ids = torch.cat([x for x, _ in samples])
    target = torch.stack([ids, torch.cat([y for _, y in samples])], dim=-1)
    args = (ids,) if any(chunk.is_first for chunk in chunks.values()) else ()
    kwargs = {"target": target} if last else {}
    params = [q for chunk in chunks.values() for q in chunk.parameters()]
    first: list = []

    def step():
        for q in params:
            q.grad = None
        losses: list = []
        schedule.step(*args, losses=losses, **kwargs)
        if not first:
            first.append([float(x.detach()) for x in losses])
    samples = [measure(step) for _ in range(warmup + steps)][warmup:]
    return {"pipeline": summarize(samples), "losses": first[0] if last else []}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

@dataclass
class Row:
    implementation: str
    covers: str
    step_s: float
    tokens_per_s: float
    loss: Optional[float]
    peak_mib: list
    growth_mib: list


def make_row(implementation: str, covers: str, per_rank: list[dict], tokens: int,
             losses: Optional[list[float]] = None) -> Row:
    slowest = [max(walls) for walls in zip(*(r["walls"] for r in per_rank))]
    step_s = statistics.median(slowest)
    loss = statistics.fmean(losses) if losses else None
    return Row(implementation, covers, step_s, tokens / step_s, loss,
               [r["peak_mib"] for r in per_rank], [r["growth_mib"] for r in per_rank])


def _fmt(x: Optional[float], spec: str = ".0f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| implementation | step covers | step ms | tokens/s | loss (first step) "
             "| peak MiB per rank | growth MiB per rank |",
             "|---|---|--:|--:|--:|---|---|"]
    for r in rows:
        lines.append(f"| {r.implementation} | {r.covers} | {r.step_s * 1e3:.1f} | {r.tokens_per_s:.0f} "
                     f"| {_fmt(r.loss, '.5f')} | {' / '.join(map(_fmt, r.peak_mib))} "
                     f"| {' / '.join(map(_fmt, r.growth_mib))} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--ep", type=int, help="expert parallel size (default: the config's, if it divides dp, else 1)")
    parser.add_argument("--model", default="tiny", help="config model=NAME")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median shown)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--microbatches", type=int, help="micro-batches per step (default: 2 x pp)")
    parser.add_argument("--micro-batch-size", type=int, help="default: the config's train.micro_batch_size")
    parser.add_argument("--seq-len", type=int, help="default: the config's data.seq_len")
    parser.add_argument("--overlap", choices=("on", "off"), default="on",
                        help="mtrain's F&B overlap of the MoE all-to-all (parallel.overlap)")
    parser.add_argument("--schedules", default=",".join(MTRAIN_SCHEDULES))
    parser.add_argument("--no-peers", action="store_true", help="skip the torch.distributed.pipelining rows")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run of the ranks")
    return parser.parse_args(argv)


def build_overrides(args: argparse.Namespace) -> list[str]:
    base = load_config([f"model={args.model}"])
    dp = args.ranks // args.pp
    ep = args.ep if args.ep is not None else (base.parallel.ep if dp % base.parallel.ep == 0 else 1)
    overrides = [
        f"model={args.model}", f"parallel.pp={args.pp}", f"parallel.ep={ep}", "parallel.tp=1",
        f"parallel.num_microbatches={args.microbatches or 2 * args.pp}",
        f"parallel.overlap={'true' if args.overlap == 'on' else 'false'}",
        f"cluster.gpus_per_node={args.ranks}", "cluster.nodes=1", "checkpoint.resume=none",
        "logging.wandb=false", "logging.progress=false", "train.collective_timeout_s=300",
    ]
    if args.micro_batch_size:
        overrides.append(f"train.micro_batch_size={args.micro_batch_size}")
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    return overrides


def describe(args: argparse.Namespace, cfg) -> str:
    p = cfg.parallel
    return (f"model={args.model}, {args.ranks} ranks: pp={p.pp} dp={args.ranks // p.pp} ep={p.ep}, "
            f"{p.num_microbatches} micro-batches of {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens, "
            f"overlap {args.overlap}, fp32, gloo; median of {args.steps} steps after {args.warmup} warm-up; "
            f"{platform.machine()} with {os.cpu_count()} CPU cores, torch {torch.__version__}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.ranks % args.pp:
        print(f"error: --ranks {args.ranks} is not a multiple of --pp {args.pp}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # inherited by the forked ranks: one thread each
    overrides = build_overrides(args)
    cfg = load_config(overrides)
    p = cfg.parallel
    tokens = cfg.train.micro_batch_size * p.num_microbatches * (args.ranks // p.pp) * cfg.data.seq_len
    rows: list[Row] = []
    for schedule in args.schedules.split(","):
        errors = schedule_errors(schedule, p.pp, p.num_microbatches)
        if errors:
            print(f"skipping {schedule}: {'; '.join(errors)}", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
            per_rank = run_distributed(mtrain_worker, args.ranks, overrides + [f"parallel.schedule={schedule}"],
                                       run_dir, args.warmup, args.steps, timeout=args.timeout)
        losses = [x for r in per_rank for x in r["losses"]]
        rows.append(make_row(f"mtrain {schedule}", "train step (+ grad reduce, optimizer)",
                             [r["train"] for r in per_rank], tokens))
        rows.append(make_row(f"mtrain {schedule}", "pipeline only", [r["pipeline"] for r in per_rank], tokens, losses))
    if not args.no_peers:
        for kind, name in PEERS.items():
            errors = schedule_errors(kind, p.pp, p.num_microbatches)
            if errors:
                print(f"skipping {name}: {'; '.join(errors)}", file=sys.stderr)
                continue
            per_rank = run_distributed(torch_peer_worker, args.ranks, kind, overrides, args.warmup, args.steps,
                                       timeout=args.timeout)
            losses = [x for r in per_rank for x in r["losses"]]
            rows.append(make_row(name, "pipeline only", [r["pipeline"] for r in per_rank], tokens, losses))
    print(describe(args, cfg))
    print()
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""mtrain eager vs ``model.compile=true``, next to Hugging Face
``DeepseekV3ForCausalLM`` eager and ``torch.compile``-d, same shapes, one run.

  python tools/bench_compile.py --model small --batch 2 --seq 256 --steps 5

Each row is one single-process model in fp32 on this machine's CPU (or the
current CUDA device with ``--device cuda`` and ``--dtype bf16``): a training
step's forward and backward (no optimizer), on the same random tokens. MTP is
off (``transformers`` has no MTP in its training forward). mtrain compiles its
regions between the GEMMs (docs/model.md); HF's model is compiled whole with
``torch.compile(model)``, graph breaks included. The first step (compilation
included) is reported apart; "step" is the median of the measured steps;
"vs HF eager" is HF eager's step time over the row's. Also printed: the number
of graphs torch compiled, graph breaks, and recompilations after the first
measured step (mtrain's must be 0 while expert counts change every step).
Needs ``transformers`` (``pip install transformers``).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrain.config.loading import load_config  # noqa: E402
from mtrain.model.hf import hf_config, require_transformers  # noqa: E402
from mtrain.model.model import ModelChunk  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="a configs/model name (default: small)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="measured steps per row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--rows", default="mtrain,mtrain-compiled,hf,hf-compiled",
                   help="comma-separated subset of the rows to run")
    return p.parse_args(argv)


def mtrain_step(cfg, device, dtype):
    torch.manual_seed(0)
    model = ModelChunk(cfg, list(range(cfg.num_layers))).to(device, dtype).train()

    def step(ids):
        out = model({"input_ids": ids, "labels": ids})
        out.loss.backward()
        return out.lm_loss
    return step, model


def hf_step(cfg, device, dtype, compiled):
    require_transformers()
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).to(device, dtype).train()
    forward = torch.compile(model) if compiled else model

    def step(ids):
        out = forward(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss
    return step, model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, model, batches, device):
    """(first step s, median step s, losses, compile counters after the first step, after all)."""
    from torch._dynamo.utils import counters

    counters.clear()
    times, losses = [], []
    for i, ids in enumerate(batches):
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        loss = step(ids)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if i == 0:
            after_first = int(counters["stats"].get("unique_graphs", 0))
    graphs = int(counters["stats"].get("unique_graphs", 0))
    breaks = sum(counters["graph_break"].values())
    return times[0], statistics.median(times[1:]), losses, graphs, breaks, graphs - after_first


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch._dynamo.config.cache_size_limit = 64
    rows = args.rows.split(",")
    results = []
    for row in rows:
        cfg = load_config([f"model={args.model}", "model.mtp_depth=0",
                           f"model.compile={'true' if row == 'mtrain-compiled' else 'false'}"]).model
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
                   for _ in range(args.steps + 1)]
        if row.startswith("mtrain"):
            step, model = mtrain_step(cfg, device, dtype)
        else:
            step, model = hf_step(cfg, device, dtype, compiled=row == "hf-compiled")
        print(f"{row}: running {args.steps + 1} steps ...", flush=True)
        first, median, losses, graphs, breaks, recompiles = measure(step, model, batches, device)
        results.append((row, first, median, losses[0], graphs, breaks, recompiles))
        del step, model

    tokens = args.batch * args.seq
    hf_eager = next((r[2] for r in results if r[0] == "hf"), None)
    print(f"\n{datetime.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__}"
          f" · model={args.model} batch={args.batch} seq={args.seq} {args.dtype} on {device}, "
          f"forward+backward, median of {args.steps}\n")
    print("| row | first step (s) | step (s) | tokens/s | vs HF eager | graphs | graph breaks | "
          "recompiles after step 1 | loss, step 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, first, median, loss, graphs, breaks, recompiles in results:
        ratio = f"{hf_eager / median:.2f}x" if hf_eager else "-"
        print(f"| {row} | {first:.2f} | {median:.3f} | {tokens / median:,.0f} | {ratio} | {graphs} | {breaks} | "
              f"{recompiles} | {loss:.4f} |")


if __name__ == "__main__":
    main()

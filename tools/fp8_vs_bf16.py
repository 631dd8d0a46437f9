#!/usr/bin/env python
"""FP8 training against the high-precision baseline: one config trained twice.

  python tools/fp8_vs_bf16.py --steps 300 --spread-seed 4321 --png docs/img/fp8_vs_bf16.png

Trains the same model, seed and data with ``train.fp8=none`` (the baseline)
and ``train.fp8=blockwise`` (DeepSeek-V3's FP8 recipe, docs/fp8.md), each on
one forked gloo rank through :class:`mtrain.train.trainer.Trainer`, and reads
both runs' ``metrics.jsonl``. It prints:

- every ``--every`` steps' LM loss of both runs and their relative difference
  ``(fp8 - baseline) / baseline``;
- the relative difference of the mean LM loss over the last ``--window``
  steps (DeepSeek-V3 reports under 0.25 % at scale);
- each run's wall time, and the FP8 run's GEMM census (which GEMM sites ran
  FP8) when the trainer recorded one;
- with ``--spread-seed N``, a third run, the baseline with ``train.seed=N``
  (another initialisation and data order), and the same difference between
  the two baselines: how far two high-precision runs of this size drift
  apart, the scale against which the FP8 difference is read.

and writes a PNG of both loss curves and their relative difference.

The baseline trains in ``train.dtype`` (``auto``: fp32 on gloo, i.e. on CPU;
bf16 on GPUs), and the output names the dtype it actually ran: on CPU the
"bf16" baseline is fp32. The default model is the tiny config with every
width a multiple of 128 (FP8 GEMMs reduce in 128-wide tiles); extra
``key=value`` arguments override either run's config.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from mtrain.config.loading import load_config
from mtrain.config.schema import resolve_dtype
from mtrain.testing import run_distributed
from mtrain.train.preflight import config_errors

# The tiny model (4 layers, 8 routed experts, MTP) at widths of 128.
MODEL = ["model.hidden_size=128", "model.q_lora_rank=128", "model.kv_lora_rank=128", "model.ffn_hidden_size=256",
         "model.moe_ffn_hidden_size=128", "model.num_heads=2", "model.qk_nope_head_dim=64",
         "model.qk_rope_head_dim=32", "model.v_head_dim=64"]
RUN = ["parallel=single", "train.micro_batch_size=8", "data.seq_len=128", "train.warmup_steps=20",
       "logging.wandb=false", "logging.progress=false", "logging.log_interval=50", "checkpoint.interval=100000",
       "cluster.gpus_per_node=1"]
KINDS = ("baseline", "fp8", "spread")


def _train(overrides: list[str], run_dir: str) -> int:
    from mtrain.train.trainer import Trainer

    return Trainer(load_config(overrides + [f"run_dir={run_dir}"]), run_dir).run()


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """Training records of ``run_dir/metrics.jsonl`` by step (evaluation lines skipped)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record and "loss" in record:
            records[record["step"]] = record
    return records


def lm_loss(record: dict) -> float:
    value = record.get("lm_loss")
    value = record["loss"] if value is None else value
    return math.nan if value is None else float(value)


def train_once(overrides: list[str], run_dir: Path, timeout: float) -> tuple[dict[int, dict], float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    codes = run_distributed(_train, 1, overrides, str(run_dir), timeout=timeout)
    wall = time.perf_counter() - start
    if codes != [0]:
        raise RuntimeError(f"training in {run_dir} exited with {codes[0]}")
    return read_metrics(run_dir), wall


def compare(base: dict[int, dict], fp8: dict[int, dict], every: int, window: int) -> dict:
    """The table's numbers from two runs' records (the same steps in both)."""
    steps = sorted(set(base) & set(fp8))
    if not steps:
        raise ValueError("the two runs have no step in common")
    b = {s: lm_loss(base[s]) for s in steps}
    f = {s: lm_loss(fp8[s]) for s in steps}
    shown = [s for s in steps if s == steps[0] or s % every == 0 or s == steps[-1]]
    last = steps[-window:]
    base_mean = sum(b[s] for s in last) / len(last)
    fp8_mean = sum(f[s] for s in last) / len(last)
    return {
        "steps": steps, "base": b, "fp8": f, "rel": {s: (f[s] - b[s]) / b[s] for s in steps},
        "rows": shown, "window": (last[0], last[-1]), "base_mean": base_mean, "fp8_mean": fp8_mean,
        "mean_rel": (fp8_mean - base_mean) / base_mean,
    }


def table(cmp: dict, base_name: str, walls: dict[str, float]) -> str:
    lines = [f"| step | {base_name} loss | FP8 loss | relative difference |", "| ---: | ---: | ---: | ---: |"]
    for s in cmp["rows"]:
        lines.append(f"| {s} | {cmp['base'][s]:.4f} | {cmp['fp8'][s]:.4f} | {100 * cmp['rel'][s]:+.2f} % |")
    first, last = cmp["window"]
    lines += [
        "",
        f"mean LM loss over steps {first}-{last}: {base_name} {cmp['base_mean']:.4f}, FP8 {cmp['fp8_mean']:.4f}, "
        f"relative difference {100 * cmp['mean_rel']:+.3f} %",
        f"wall time: {base_name} {walls['baseline']:.0f} s, FP8 {walls['fp8']:.0f} s",
    ]
    return "\n".join(lines)


def _running_mean(values: list[float]) -> tuple[list[float], int]:
    span = max(1, min(20, len(values) // 5))  # the per-step noise hides the trend
    return [sum(values[max(0, i - span + 1):i + 1]) / len(values[max(0, i - span + 1):i + 1])
            for i in range(len(values))], span


def plot(cmp: dict, base_name: str, path: Path, title: str, spread: Optional[dict] = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = cmp["steps"]
    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.plot(steps, [cmp["base"][s] for s in steps], label=base_name, linewidth=1.2)
    top.plot(steps, [cmp["fp8"][s] for s in steps], label="FP8 (blockwise)", linewidth=1.2, alpha=0.8)
    top.set_ylabel("LM loss")
    top.set_title(title, fontsize=8)
    top.legend()
    top.grid(alpha=0.3)
    rel = [100 * cmp["rel"][s] for s in steps]
    bottom.plot(steps, rel, color="#c9a0dc", linewidth=0.6, label="per step")
    smooth, span = _running_mean(rel)
    bottom.plot(steps, smooth, color="#7b3f99", linewidth=1.2, label=f"mean of {span} steps")
    if spread is not None:
        other = [100 * spread["rel"][s] for s in spread["steps"]]
        bottom.plot(spread["steps"], _running_mean(other)[0], color="gray", linewidth=1.0, linestyle="--",
                    label=f"{base_name}, another seed (mean of {span} steps)")
    bottom.axhline(0.0, color="black", linewidth=0.6)
    first, last = cmp["window"]
    bottom.hlines(100 * cmp["mean_rel"], first, last, colors="#b00020",
                  label=f"steps {first}-{last} mean: {100 * cmp['mean_rel']:+.3f} %")
    bottom.set_xlabel("step")
    bottom.set_ylabel("(FP8 - base) / base, %")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25, help="table rows every this many steps")
    parser.add_argument("--window", type=int, default=50, help="last steps whose mean loss is compared")
    parser.add_argument("--out", type=Path, default=Path("runs/fp8_vs_bf16"),
                        help="run directories <out>/baseline and <out>/fp8 (emptied first)")
    parser.add_argument("--png", type=Path, help="default: <out>/fp8_vs_bf16.png")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per training run")
    parser.add_argument("--spread-seed", type=int, help="also train the baseline with this train.seed, to show the "
                        "run-to-run spread")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs (key=value)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    import shutil

    args = parse_args(argv)
    common = MODEL + RUN + [f"train.steps={args.steps}"] + list(args.overrides)
    runs = {"baseline": common + ["train.fp8=none"], "fp8": common + ["train.fp8=blockwise"]}
    if args.spread_seed is not None:
        runs["spread"] = common + ["train.fp8=none", f"train.seed={args.spread_seed}"]
    for kind, overrides in runs.items():
        errors = config_errors(load_config(overrides), world_size=1)
        if errors:
            print(f"error: the {kind} config: " + "; ".join(errors), file=sys.stderr)
            return 2
    cfg = load_config(runs["baseline"])
    base_name = f"{resolve_dtype(cfg.train.dtype, 'gloo')} baseline"
    metrics, walls = {}, {}
    for kind in (k for k in KINDS if k in runs):
        run_dir = args.out / kind
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"training {kind} ({args.steps} steps) in {run_dir} ...", file=sys.stderr, flush=True)
        metrics[kind], walls[kind] = train_once(runs[kind], run_dir, args.timeout)
    cmp = compare(metrics["baseline"], metrics["fp8"], args.every, args.window)
    m = cfg.model
    about = (f"model {m.name} (hidden {m.hidden_size}, {m.num_layers} layers, {m.num_routed_experts} routed experts), "
             f"{cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens per step,\nseed {cfg.train.seed}, "
             f"baseline dtype {resolve_dtype(cfg.train.dtype, 'gloo')}, one CPU rank")
    print(about)
    census = metrics["fp8"][min(metrics["fp8"])].get("fp8_gemms")
    if census is not None:
        rest = metrics["fp8"][min(metrics["fp8"])].get("high_precision_gemms")
        print(f"FP8 GEMM sites: {census}; high precision: {rest}")
    print()
    print(table(cmp, base_name, walls))
    spread = None
    if "spread" in metrics:
        spread = compare(metrics["baseline"], metrics["spread"], args.every, args.window)
        first, last = spread["window"]
        print(f"{base_name} with train.seed={args.spread_seed} against seed {cfg.train.seed}: mean LM loss over steps "
              f"{first}-{last} {spread['fp8_mean']:.4f}, relative difference {100 * spread['mean_rel']:+.3f} % "
              f"(run-to-run spread; wall {walls['spread']:.0f} s)")
    png = args.png or args.out / "fp8_vs_bf16.png"
    plot(cmp, base_name, png, f"FP8 (blockwise) vs {base_name}\n{about}", spread)
    print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

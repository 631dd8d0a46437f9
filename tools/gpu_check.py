"""The one-GPU check: everything mtrain can prove on a single GPU, in one
table, in at most about 8 minutes on an H200.

    python tools/gpu_check.py                  # on a machine with one GPU
    python tools/gpu_check.py --dry-run        # the same steps, tiny, on CPU (checks the script itself)

It runs on a bare GPU machine without network access, under that machine's
Python and torch. mtrain needs, beyond torch: hydra-core, omegaconf and
antlr4-python3-runtime==4.9.3 (Hydra's parser), plus numpy, matplotlib, tqdm
and tokenizers, which GPU images usually hold. Bring the missing ones as
wheels and install mtrain itself offline from the checkout:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
    PYTHONPATH=/tmp/site python3 tools/gpu_check.py

Rows (each step has its own time limit; a failure is a row, not a crash):

- ``device``: torch, CUDA and the GPU.
- ``dense bf16``: the measured matmul rate, the ceiling the other rows use.
- ``grouped GEMM <backend>``: the routed experts' GEMM at DeepSeek-V3 expert
  shapes (hidden 7168, expert width 2048, skewed rows, one empty expert),
  forward TFLOP/s and its share of the dense rate, per backend.
- ``FP8 GEMM scaled_mm``: blockwise FP8 (1x128 x 128x128, torch's scaled
  matmul, ``train.fp8_backend=scaled_mm``) at 8192 x 7168 x 2048 against the
  dense bf16 rate, and its relative error against the FP8 reference.
- ``host syncs``: one MoE layer's forward and backward under
  ``torch.cuda.set_sync_debug_mode("warn")`` (what CUDA itself reports) and
  mtrain's own counter.
- ``activation memory``: one MoE layer recorded by the pipeline runtime
  against plain autograd (``tools/bench_activation_memory.py``).
- ``compile <row>``: ``tools/bench_compile.py`` (model ``small``, bf16):
  mtrain eager and ``model.compile=true``, and HF ``DeepseekV3ForCausalLM``
  eager and compiled when ``transformers`` is there; tokens/s, graphs,
  graph breaks, recompilations.
- ``gpu tests``: ``pytest tests/gpu``.
- ``train small bf16``: ``mtrain-train`` on one GPU (model ``small``,
  ``train.dtype=auto``), checkpoint, then resume: tokens/s, TFLOP/s, MFU,
  peak memory against ``mtrain-plan``'s estimate, the loss continuing.

Read the table, put it in docs/benchmarks.md with the date.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ROWS: list[tuple[str, str, str]] = []  # (check, result, figures)


def row(check: str, result: str, figures: str = "") -> None:
    ROWS.append((check, result, figures))
    print(f"[{time.strftime('%H:%M:%S')}] {check}: {result} {figures}", flush=True)


def attempt(check: str, fn, *args) -> None:
    """Run one step; any failure becomes its row."""
    start = time.perf_counter()
    try:
        fn(*args)
    except Exception as e:  # one failing step must not hide the others
        row(check, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        print(f"    ({time.perf_counter() - start:.1f} s)", flush=True)


def timed(fn, iters: int) -> float:
    """Seconds per call of ``fn`` (CUDA events on a GPU, after a warm-up)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


# -- the steps ------------------------------------------------------------------

def device_row(args) -> None:
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        row("device", "ok", f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                            f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        row("device", "dry run", f"CPU, torch {torch.__version__}")


def dense_rate(args) -> float:
    n = 8192 if args.device == "cuda" else 256
    a = torch.randn(n, n, device=args.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=args.device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, 20 if args.device == "cuda" else 2)
    rate = 2 * n**3 / seconds / 1e12
    row("dense bf16", "ok", f"{rate:.1f} TFLOP/s ({n}^3 matmul)")
    return rate


def grouped_gemm_rows(args, dense: float) -> None:
    from mtrain.model.moe import gemm_backends

    hidden, width = (7168, 2048) if args.device == "cuda" else (64, 32)
    # Skewed rows over 8 local experts, one empty: a hot expert, a long tail.
    shares = [0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05, 0.0]
    total = 32768 if args.device == "cuda" else 256
    counts = [int(total * s) for s in shares]
    counts[0] += total - sum(counts)
    x = torch.randn(total, hidden, device=args.device, dtype=torch.bfloat16)
    w = torch.randn(len(counts), width, hidden, device=args.device, dtype=torch.bfloat16)
    flops = 2 * total * hidden * width
    for kind in ("torch", "grouped_mm", "triton"):
        try:
            backend = gemm_backends.grouped_gemm_backend(kind)
        except (ImportError, RuntimeError) as e:
            row(f"grouped GEMM {kind}", "skipped", str(e).splitlines()[0][:120])
            continue
        seconds = timed(lambda: backend.forward(x, w, counts), 10 if args.device == "cuda" else 1)
        rate = flops / seconds / 1e12
        row(f"grouped GEMM {kind}", "ok", f"{rate:.1f} TFLOP/s = {rate / dense:.0%} of dense "
                                          f"(rows {total}, {hidden}x{width}, experts {counts})")


def moe_layer(args, hidden: int, tokens: int):
    from mtrain.config.loading import load_config
    from mtrain.model.moe.layer import MoELayer

    cfg = load_config([f"model.hidden_size={hidden}", "model.num_routed_experts=16", "model.moe_topk=8",
                       "model.moe_ffn_hidden_size=512", "model.n_group=1", "model.topk_group=1"]).model
    torch.manual_seed(0)
    layer = MoELayer(cfg).to(args.device)
    return layer, torch.randn(1, tokens, hidden, device=args.device)


def fp8_gemm_rows(args, dense: float) -> None:
    """Blockwise FP8 (1x128 x 128x128, torch's scaled matmul) at a V3 expert
    shape against bf16, and its error against the reference on the same data."""
    from mtrain.model import fp8, fp8_scaled_mm

    m, k, n = (8192, 7168, 2048) if args.device == "cuda" else (256, 256, 128)
    x = torch.randn(m, k, device=args.device)
    w = torch.randn(n, k, device=args.device) * 0.02
    qx, sx = fp8.quantize_tiles(x)
    qw, sw = fp8.quantize_blocks(w)
    reason = fp8_scaled_mm.unavailable_reason(torch.device(args.device))
    if reason is not None:
        row("FP8 GEMM scaled_mm", "skipped", reason)
        return
    seconds = timed(lambda: fp8_scaled_mm.scaled_mm_matmul(qx, sx, qw, sw, torch.bfloat16), 20)
    rate = 2 * m * n * k / seconds / 1e12
    got = fp8_scaled_mm.scaled_mm_matmul(qx, sx, qw, sw).float().cpu()
    want = fp8.fp8_matmul(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu())
    error = ((got - want).norm() / want.norm()).item()
    row("FP8 GEMM scaled_mm", "ok", f"{rate:.1f} TFLOP/s = {rate / dense:.2f}x dense bf16 ({m}x{k} @ {k}x{n}); "
                                    f"relative error vs reference {error:.1e}")


def host_sync_row(args) -> None:
    from mtrain.runtime.context import StepContext
    from mtrain.testing.syncs import HostSyncCounter

    layer, x = moe_layer(args, 1024, 4096 if args.device == "cuda" else 128)
    layer(x, StepContext()).sum().backward()  # warm-up: first calls initialise libraries
    cuda_warnings = 0
    with HostSyncCounter() as ours, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            y = layer(x.requires_grad_(), StepContext())
            y.square().sum().backward()
        finally:
            if args.device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        cuda_warnings = sum("synchroniz" in str(w.message) for w in caught)
    row("host syncs, one MoE layer", "ok" if ours.count <= 1 else "over budget",
        f"CUDA reports {cuda_warnings}, mtrain counts {ours.count} {dict(ours.by_name)} (budget 1)")


def activation_memory_row(args) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_activation_memory as bench

    shape = ["--tokens", "4096"] if args.device == "cuda" else ["--hidden", "64", "--ffn", "32", "--tokens", "64"]
    namespace = argparse.Namespace(hidden=1024, experts=16, topk=4, ffn=512, tokens=4096)
    parsed = vars(namespace) | {k.lstrip("-"): int(v) for k, v in zip(shape[::2], shape[1::2])}
    layer, x = bench.build(argparse.Namespace(**parsed))
    peaks = {name: bench.measure(fn, layer, x)[0] for name, fn in bench.VARIANTS.items()}
    base = peaks["plain autograd"]
    parts = []
    for kind in base:
        parts.append(f"{kind}: recorded {peaks['recorded'][kind]:.0f} MiB = "
                     f"{peaks['recorded'][kind] / base[kind]:.1%} of plain {base[kind]:.0f} MiB")
    ratio = peaks["recorded"]["live tensors"] / base["live tensors"]
    row("activation memory, one MoE layer", "ok" if ratio <= 1.03 else "over 3 %", "; ".join(parts))


def compile_rows(args) -> None:
    import importlib.util

    rows = "mtrain,mtrain-compiled" + (",hf,hf-compiled" if importlib.util.find_spec("transformers") else "")
    shape = (["--model", "small", "--dtype", "bf16", "--seq", "1024", "--batch", "4"] if args.device == "cuda"
             else ["--model", "tiny", "--seq", "32", "--steps", "2"])
    cmd = [sys.executable, "tools/bench_compile.py", "--device", args.device, "--rows", rows, *shape]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.test_timeout)
    if out.returncode:
        raise RuntimeError(out.stderr.strip()[-300:])
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| mtrain") or line.startswith("| hf"):
            name, _, step, tokens, ratio, graphs, breaks, recompiles, _ = cells
            broken = name == "mtrain-compiled" and (breaks != "0" or recompiles != "0")
            row(f"compile, {name}", "FAILED" if broken else "ok", f"{tokens} tokens/s ({step} s/step, {ratio} HF eager); graphs {graphs}, "
                               f"breaks {breaks}, recompiles {recompiles}")


def gpu_tests_row(args) -> None:
    if args.device != "cuda":
        row("gpu tests", "skipped", "dry run")
        return
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=args.test_timeout)
    summary = (out.stdout.strip().splitlines() or ["no output"])[-1]
    row("gpu tests", "ok" if out.returncode == 0 else "FAILED", summary)
    if out.returncode:
        print(out.stdout[-3000:], out.stderr[-2000:], sep="\n")


def train_rows(args) -> None:
    from mtrain.planner.plan import make_plan
    from mtrain.config.loading import load_config

    steps, first = (40, 20) if args.device == "cuda" else (4, 2)
    overrides = ["parallel=single", "cluster.gpus_per_node=1", "logging.wandb=false", "logging.progress=false",
                 f"checkpoint.interval={first}", "logging.log_interval=10"]
    overrides += ["model=small"] if args.device == "cuda" else ["model=tiny", "data.seq_len=32"]
    run_dir = Path(tempfile.mkdtemp(prefix="mtrain-gpu-check-"))

    def train(until: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "mtrain.cli.train", *overrides, f"train.steps={until}", f"run_dir={run_dir}"]
        env = dict(os.environ, WANDB_MODE="disabled")
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.train_timeout, env=env)
        if out.returncode:
            raise RuntimeError(f"mtrain-train exited {out.returncode}: {out.stderr.strip()[-600:]}")

    train(first)
    train(steps)  # resumes from the checkpoint of step `first`
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    log = (run_dir / "logs" / "rank0.log").read_text()
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    dtype = re.search(r"training in (\w+)", log)
    late = metrics[len(metrics) // 2:]
    mean = lambda key: sum(m[key] or 0 for m in late) / len(late)  # noqa: E731
    mfu = [m["mfu"] for m in late if m.get("mfu") is not None]
    mfu_text = f"MFU {sum(mfu) / len(mfu):.1%}" if mfu else "MFU n/a (peak unknown)"
    row("train small, speed", "ok", f"{mean('tokens_per_s'):.0f} tokens/s, "
                                    f"{mean('tflops_per_device'):.1f} TFLOP/s, {mfu_text} (second half of the run)")
    cfg = load_config(overrides + [f"train.steps={steps}"])
    estimate = make_plan(cfg, 1)["memory"][0]["total"] / 2**30
    peak = max(m["peak_memory_gb"] for m in metrics)
    row("train small, peak memory", "ok", f"measured {peak:.2f} GiB, plan {estimate:.2f} GiB "
                                          f"({peak / estimate:.0%} of the estimate)")
    losses = [m["lm_loss"] for m in metrics]
    finite = all(loss == loss for loss in losses)  # NaN != NaN
    ok = resumed and int(resumed.group(1)) == first and len(metrics) == steps and finite and losses[-1] < losses[0]
    row("train small, checkpoint + resume", "ok" if ok else "FAILED",
        f"{dtype.group(1) if dtype else '?'}; resumed at step {resumed.group(1) if resumed else '-'}; "
        f"lm loss {losses[0]:.3f} -> {losses[first - 1]:.3f} -> {losses[-1]:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the script, not a GPU")
    parser.add_argument("--test-timeout", type=int, default=240)
    parser.add_argument("--train-timeout", type=int, default=150)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or --dry-run", file=sys.stderr)
        return 2
    args.device = "cpu" if args.dry_run else "cuda"
    start = time.perf_counter()
    attempt("device", device_row, args)
    dense = 1.0
    try:
        dense = dense_rate(args)
    except Exception as e:
        row("dense bf16", "FAILED", str(e)[:160])
    attempt("grouped GEMM", grouped_gemm_rows, args, dense)
    attempt("FP8 GEMM", fp8_gemm_rows, args, dense)
    attempt("host syncs, one MoE layer", host_sync_row, args)
    attempt("activation memory, one MoE layer", activation_memory_row, args)
    attempt("compile", compile_rows, args)
    attempt("gpu tests", gpu_tests_row, args)
    attempt("train small", train_rows, args)
    width = max(len(c) for c, _, _ in ROWS)
    print(f"\nmtrain GPU check, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s\n")
    print(f"| {'check':<{width}} | result | figures |\n|{'-' * (width + 2)}|--------|---------|")
    for check, result, figures in ROWS:
        print(f"| {check:<{width}} | {result} | {figures} |")
    return 0 if all(r not in ("FAILED",) for _, r, _ in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())

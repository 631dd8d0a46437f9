"""Activation memory of one MoE layer: plain autograd against the pipeline
runtime's step-by-step recording, side by side in one run.

    python tools/bench_activation_memory.py
    python tools/bench_activation_memory.py --hidden 1024 --experts 16 --topk 4 --tokens 4096 --repeats 3

The layer (router, dispatch, grouped experts, combine, shared expert) runs its
forward and backward three ways on the same weights and input:

- ``plain``: ``MoELayer.forward`` under autograd (the reference);
- ``recorded``: the runtime's ``forward_steps``/``backward_steps``, as the
  pipeline executor runs it, each step's carries recorded until the backward;
- ``recorded, keep rows``: the same with the exchanges' ``release_sent`` and
  ``release_received`` switched off, i.e. the exchanged row tensors kept by
  the recording until the backward (what the runtime did before).

Printed per variant: the peak memory of the tensors the forward and backward
create (exact live tensor bytes, :class:`~mtrain.testing.memory.LiveTensorMemory`,
on any device; on CUDA also ``max_memory_allocated`` above the start, the
allocator's view) and its ratio to plain autograd. Gradients are checked
equal across the variants, so the figures describe the same work.
"""
from __future__ import annotations

import argparse
import gc
import sys

import torch

from mtrain.config.loading import load_config
from mtrain.model.moe.layer import MoECarry, MoELayer
from mtrain.runtime.context import StepContext
from mtrain.runtime.program import Recording, backward_steps, drain, forward_steps, keeping_exchanged
from mtrain.testing.memory import LiveTensorMemory, peak_memory, reset_peak_memory


def build(args) -> tuple[MoELayer, torch.Tensor]:
    overrides = [f"model.hidden_size={args.hidden}", f"model.num_routed_experts={args.experts}",
                 f"model.moe_topk={args.topk}", f"model.moe_ffn_hidden_size={args.ffn}",
                 "model.n_group=1", "model.topk_group=1", "model.num_shared_experts=1"]
    cfg = load_config(overrides).model
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = MoELayer(cfg).to(device)
    x = torch.randn(1, args.tokens, args.hidden, device=device)
    return layer, x


def plain(layer: MoELayer, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    layer(x, StepContext()).square().sum().backward()


def recorded(layer: MoELayer, x: torch.Tensor, release: bool = True) -> None:
    steps = layer.standalone_program()
    rec = Recording(StepContext())
    carry = MoECarry(normed=x.clone().requires_grad_(True))
    # d(sum(y^2))/dy, handed over with no reference to the output or the gradient kept here,
    # as plain autograd keeps none: what the backward needs of them, the recording holds.
    drain(backward_steps(rec, {"hidden": 2 * drain(forward_steps(steps if release else keeping_exchanged(steps),
                                                                 carry, rec)).hidden.detach()}))


VARIANTS = {
    "plain autograd": plain,
    "recorded": recorded,
    "recorded, keep rows": lambda layer, x: recorded(layer, x, release=False),
}


def measure(fn, layer, x) -> tuple[dict, dict]:
    """Peaks in MiB (live tensors; the CUDA allocator when on a GPU) and the gradients."""
    layer.zero_grad(set_to_none=True)
    gc.collect()
    start = reset_peak_memory() if x.is_cuda else None
    with LiveTensorMemory() as live:
        fn(layer, x)
    peaks = {"live tensors": live.peak_bytes / 2**20}
    if start is not None:
        peaks["cuda allocator"] = peak_memory() - start
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return peaks, grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512, help="expert width")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    layer, x = build(args)
    print(f"one MoE layer: hidden {args.hidden}, {args.experts} experts of width {args.ffn}, top-{args.topk}, "
          f"{args.tokens} tokens, fp32, {'cuda' if x.is_cuda else 'cpu'}")
    peaks, reference = {}, None
    for name, fn in VARIANTS.items():
        peaks[name], grads = measure(fn, layer, x)
        reference = reference or grads
        for n, g in grads.items():
            if not torch.allclose(g, reference[n], rtol=1e-5, atol=1e-6):
                print(f"error: {name} gives a different gradient for {n}", file=sys.stderr)
                return 1
    kinds = list(peaks["plain autograd"])
    print(f"{'variant':<22}" + "".join(f" {k + ' MiB':>20} {'vs plain':>9}" for k in kinds))
    for name, peak in peaks.items():
        print(f"{name:<22}" + "".join(f" {peak[k]:>20.1f} {peak[k] / peaks['plain autograd'][k]:>8.1%}"
                                      for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

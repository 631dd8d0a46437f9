"""Held-out evaluation through the training pipeline (docs/evaluation.md).

An evaluation runs ``eval.steps`` held-out global batches
(:class:`~mtrain.data.heldout.EvalBatches`: the same ones every time) through
:meth:`~mtrain.pipeline.executor.PipelineExecutor.forward_only`: every
micro-batch's forward through all stages, over the same p2p channels and
expert all-to-alls as training, under ``torch.no_grad`` with the model in eval
mode (routers neither count loads for the bias update nor add their auxiliary
loss). Nothing of training changes: no gradient, no optimizer or router state,
no data position, no random draw.

The LM loss is the mean over every micro-batch of every data-parallel replica
of its mean token loss (all micro-batches hold as many tokens), summed in
fp64 on the device and read once. Micro-batch losses are fp32 values of a few
units, whose fp64 sum is exact in any order, so layouts that compute the same
micro-batch losses report the same bits. MTP is reported apart (``mtp_loss``),
perplexity is ``exp(lm_loss)``.

With ``eval.prompt`` and a tokenizer, a greedy continuation of the prompt is
generated through the same pipeline (the last stage's ``greedy`` program ends
in the most likely next token of every position) and logged with the record.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from mtrain.data.heldout import EvalBatches
from mtrain.data.tokenizer import Tokenizer

log = logging.getLogger("mtrain")

Progress = Callable[[int], None]  # advance an evaluation progress display by n batches


@contextlib.contextmanager
def eval_mode(modules: Iterable[torch.nn.Module]):
    """Every module (and its children) in eval mode; each module's own mode comes back after."""
    modes = {m: m.training for module in modules for m in module.modules()}
    for m in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class Evaluator:
    """Evaluates the model one rank holds; every rank calls :meth:`run` together.

    ``executor``: the rank's pipeline executor for ``batches.num_microbatches``
    micro-batches; ``chunks``: its model chunks; ``speaks``: this rank adds its
    last-stage losses to the global sums (one rank per tensor-parallel group).
    ``tokenizer`` and ``prompt`` turn on the greedy sample.
    """

    def __init__(self, eval_cfg, model_cfg, batches: EvalBatches, executor, chunks: dict, speaks: bool,
                 device: torch.device, source: str, tokenizer: Optional[Tokenizer] = None,
                 tp_size: int = 1):
        self.cfg, self.model_cfg = eval_cfg, model_cfg
        self.batches, self.executor, self.chunks = batches, executor, chunks
        self.speaks, self.device, self.source = speaks, device, source
        self.tokenizer, self.tp_size = tokenizer, tp_size
        self.prompt_ids = self._prompt_ids() if tokenizer is not None and eval_cfg.prompt else None

    def _prompt_ids(self) -> list[int]:
        ids = self.tokenizer.encode(str(self.cfg.prompt))
        room = self.model_cfg.max_seq_len - int(self.cfg.sample_tokens)
        if room < 1:
            raise ValueError(f"eval.sample_tokens={self.cfg.sample_tokens} leaves no room for the prompt within "
                             f"model.max_seq_len={self.model_cfg.max_seq_len}: lower eval.sample_tokens")
        if len(ids) > room:
            log.warning("eval.prompt is %d tokens; keeping its last %d (model.max_seq_len=%d, eval.sample_tokens=%d)",
                        len(ids), room, self.model_cfg.max_seq_len, self.cfg.sample_tokens)
            ids = ids[-room:]
        return ids or [self.tokenizer.eos_id]

    # -- the loss -----------------------------------------------------------------
    def run(self, step: int, progress: Optional[Progress] = None) -> dict:
        """Evaluate now; the record (the same on every rank) for metrics.jsonl."""
        start = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # lm, mtp, micro-batches
        with eval_mode(self.chunks.values()):
            for k in range(len(self.batches)):
                batch = [{"input_ids": x.to(self.device, non_blocking=True),
                          "labels": y.to(self.device, non_blocking=True)} for x, y in self.batches.batch(k)]
                result = self.executor.forward_only(batch)
                if self.speaks:
                    for carry in result.outputs.values():
                        sums[0] += carry.lm_loss.double()
                        if carry.mtp_loss is not None:
                            sums[1] += carry.mtp_loss.double()
                        sums[2] += 1
                if progress is not None:
                    progress(1)
            dist.all_reduce(sums)
            lm, mtp = self._means(sums)
            sample = self.sample() if self.prompt_ids is not None else None
        samples = self.batches.samples
        record = {"kind": "eval", "step": step, "source": self.source, "lm_loss": lm, "ppl": perplexity(lm)}
        if self.model_cfg.mtp_depth > 0:
            record["mtp_loss"] = mtp
        record.update(samples=samples, tokens=samples * self.batches.dataset.seq_len,
                      eval_time_s=time.perf_counter() - start)
        if sample is not None:
            record["sample"] = sample
        return record

    @staticmethod
    def _means(sums: torch.Tensor) -> tuple[float, float]:
        """(mean LM loss, mean MTP loss) from the fp64 sums and the micro-batch count (read at once)."""
        lm, mtp, count = sums.tolist()
        count = max(count, 1.0)
        return lm / count, mtp / count

    # -- greedy sample --------------------------------------------------------------
    def sample(self) -> dict:
        """The greedy continuation of ``eval.prompt`` (``eval.sample_tokens`` tokens at
        most, stopping at EOS): every rank runs the same forwards; the next token
        comes from the rank holding the last stage."""
        prompt, pad = list(self.prompt_ids), self.tokenizer.eos_id
        want = int(self.cfg.sample_tokens)
        # One fixed shape for every forward: right padding does not reach earlier positions
        # (causal attention), and the routers split the tokens over tensor-parallel ranks.
        length = -(-(len(prompt) + want) // self.tp_size) * self.tp_size
        ids = torch.full((1, length), pad, dtype=torch.int64, device=self.device)
        ids[0, :len(prompt)] = torch.tensor(prompt, dtype=torch.int64, device=self.device)
        out, cur = [], len(prompt)
        for _ in range(want):
            batch = {"input_ids": ids.clone(), "labels": torch.zeros_like(ids)}
            result = self.executor.forward_only([batch], program=lambda chunk: chunk.program(greedy=True))
            token = torch.full((1,), -1, dtype=torch.int64, device=self.device)
            if 0 in result.outputs:
                token[0] = result.outputs[0].next_ids[0, cur - 1]
            dist.all_reduce(token, op=dist.ReduceOp.MAX)
            value = int(token.item())
            if value == pad:
                break
            out.append(value)
            ids[0, cur] = value
            cur += 1
        return {"prompt": str(self.cfg.prompt), "completion": self.tokenizer.decode(out), "tokens": len(out)}

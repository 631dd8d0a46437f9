"""The DeepSeek-V3-style model, built as pipeline chunks.

A :class:`ModelChunk` holds the decoder layers of one pipeline stage, plus the
embedding on the first stage and the final norm, output head and MTP modules
on the last. The whole model is simply the chunk holding every layer. A chunk
is a program over a :class:`TokenCarry` (see :mod:`mtrain.runtime.program`):
the same code runs the plain ``forward()`` and the pipeline runtime's
overlapped forward/backward.

Parameter names are global (``layers.<global index>...``), so the state dicts
of all chunks together are the single-rank model's state dict: that is what
initialisation, sharding and checkpoints rely on.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from mtrain.model.attention import ReplicatedLinear
from mtrain.model.block import DecoderLayer, LayerCarry
from mtrain.model.groups import ModelGroups
from mtrain.model.norm import RMSNorm
from mtrain.model.params import meta
from mtrain.model.rope import rope_tables
from mtrain.model.sharding import shard_tensor
from mtrain.model.tp import (ParallelLMHead, VocabParallelEmbedding, vocab_parallel_argmax,
                             vocab_parallel_cross_entropy)
from mtrain.runtime.context import StepContext
from mtrain.runtime.program import Compute, Program, run_plain

IGNORE = -100


def token_loss(logits_shard, targets, tp_group, vocab_size) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE."""
    valid = targets != IGNORE
    losses = vocab_parallel_cross_entropy(logits_shard.float(), targets.clamp(min=0), tp_group, vocab_size)
    return (losses * valid).sum() / valid.sum().clamp(min=1)


@dataclass
class TokenCarry(LayerCarry):
    """What flows through a chunk: the layer carry plus the micro-batch's
    tokens and, on the last stage, the losses."""

    input_ids: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    mtp_loss: Optional[torch.Tensor] = None  # summed over the depths run so far
    loss: Optional[torch.Tensor] = None
    next_ids: Optional[torch.Tensor] = None  # greedy decoding: the most likely next token per position


class MTPModule(nn.Module):
    """Multi-token prediction depth k: RMSNorm the previous hidden state and the
    embedding of the token k ahead, concatenate, project 2d -> d, one decoder
    layer; the caller applies the shared head."""

    def __init__(self, cfg, depth: int, groups: ModelGroups):
        super().__init__()
        self.depth = depth
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile)
        self.embed_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile)
        self.proj = ReplicatedLinear(2 * cfg.hidden_size, cfg.hidden_size, cfg.init_std, fp8=groups.fp8)
        # Global index past the main layers keeps parameter and step names unique.
        self.layer = DecoderLayer(cfg, cfg.num_layers + depth - 1, groups)
        self.layer.name = f"MTP{depth}"
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile)


class ModelChunk(nn.Module):
    def __init__(self, cfg, layers: list[int], stage: int = 0, is_first: bool = True, is_last: bool = True,
                 groups: Optional[ModelGroups] = None, shared_embedding: Optional[nn.Module] = None):
        super().__init__()
        groups = groups or ModelGroups()
        self.cfg, self.groups = cfg, groups
        self.stage, self.is_first, self.is_last = stage, is_first, is_last
        needs_embedding = is_first or (is_last and cfg.mtp_depth > 0)
        if needs_embedding:
            self.embed = shared_embedding or VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, groups.tp, cfg.init_std)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, groups) for i in layers})
        if is_last:
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile)
            self.head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, groups.tp, cfg.init_std)
            self.mtp = nn.ModuleList(MTPModule(cfg, k, groups) for k in range(1, cfg.mtp_depth + 1))

    # The Chunk interface (mtrain.runtime.runner).
    def boundary_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
        return (batch_size, seq_len, self.cfg.hidden_size)

    def initial_carry(self, batch: dict, received: Optional[torch.Tensor]) -> TokenCarry:
        ids = batch["input_ids"]
        return TokenCarry(input_ids=ids, labels=batch["labels"] if self.is_last else None,
                          hidden=None if self.is_first else received,
                          rope=rope_tables(self.cfg, ids.shape[1], ids.device))

    def program(self, greedy: bool = False) -> Program:
        """The chunk's steps. ``greedy``: a last stage ends in the most likely
        next token of every position (``next_ids``, no loss, no MTP) instead."""
        steps = []
        if self.is_first:
            steps.append(Compute(self._embed, "embed"))
        for layer in self.layers.values():
            steps += layer.program()
        if self.is_last and greedy:
            steps.append(Compute(self._greedy, "greedy"))
            return Program(steps, output="next_ids", input="hidden")
        if self.is_last:
            steps.append(Compute(self._head, "head"))
            for mtp in self.mtp:
                steps.append(Compute(lambda c, s, m=mtp: self._mtp_input(c, m), f"mtp{mtp.depth}.input"))
                steps += mtp.layer.program()
                steps.append(Compute(lambda c, s, m=mtp: self._mtp_loss(c, m), f"mtp{mtp.depth}.loss"))
            steps.append(Compute(self._total_loss, "loss"))
        return Program(steps, output="loss" if self.is_last else "hidden", input="hidden")

    def forward(self, batch: dict, received: Optional[torch.Tensor] = None,
                step: Optional[StepContext] = None) -> TokenCarry:
        """Plain (non-pipelined) forward: the final carry (``loss`` and its parts
        on the last stage, else the hidden state ``hidden``)."""
        return run_plain(self.program().steps, self.initial_carry(batch, received), step or StepContext())

    def logits(self, input_ids: torch.Tensor, mtp: bool = False):
        """Logits ``[B, S, vocab]`` (this TP rank's vocabulary columns, padding
        included) of a chunk holding the whole model, no loss: the main
        model's, or with ``mtp`` a list of the main model's then each MTP
        depth's (depth k at position i predicts token i+k+1; its last k
        positions see wrapped-around tokens)."""
        steps = [Compute(self._embed, "embed")] + [s for layer in self.layers.values() for s in layer.program()]
        step = StepContext()
        c = run_plain(steps, self.initial_carry({"input_ids": input_ids, "labels": None}, None), step)
        out = [self.head(self.final_norm(c.hidden))]
        for module in self.mtp if mtp else ():
            c = run_plain(module.layer.program(), self._mtp_input(c, module), step)
            out.append(self.head(module.final_norm(c.hidden)))
        return out if mtp else out[0]

    # Steps.
    def _embed(self, c: TokenCarry, step) -> TokenCarry:
        return c.replace(hidden=self.embed(c.input_ids))

    def _logits_loss(self, hidden, norm, targets):
        return token_loss(self.head(norm(hidden)), targets, self.groups.tp, self.cfg.vocab_size)

    def _head(self, c: TokenCarry, step) -> TokenCarry:
        return c.replace(lm_loss=self._logits_loss(c.hidden, self.final_norm, c.labels))

    def _mtp_input(self, c: TokenCarry, mtp: MTPModule) -> TokenCarry:
        # Position i combines the hidden state at i (the main model's, then the
        # previous depth's) with the embedding of token i+k; the last k
        # positions have no such token and are masked from the loss.
        ahead = torch.roll(c.input_ids, -mtp.depth, dims=1)
        combined = torch.cat([mtp.hidden_norm(c.hidden), mtp.embed_norm(self.embed(ahead))], dim=-1)
        return c.replace(hidden=mtp.proj(combined))

    def _mtp_loss(self, c: TokenCarry, mtp: MTPModule) -> TokenCarry:
        targets = torch.roll(c.labels, -mtp.depth, dims=1)
        targets[:, -mtp.depth:] = IGNORE
        loss = self._logits_loss(c.hidden, mtp.final_norm, targets)
        return c.replace(mtp_loss=loss if c.mtp_loss is None else c.mtp_loss + loss)

    def _greedy(self, c: TokenCarry, step) -> TokenCarry:
        logits = self.head(self.final_norm(c.hidden))
        return TokenCarry(next_ids=vocab_parallel_argmax(logits, self.groups.tp, self.cfg.vocab_size))

    def _total_loss(self, c: TokenCarry, step) -> TokenCarry:
        loss, mtp = c.lm_loss, None
        if self.cfg.mtp_depth > 0:
            mtp = c.mtp_loss / self.cfg.mtp_depth
            loss = loss + self.cfg.mtp_loss_weight * mtp
            mtp = mtp.detach()
        # Only the losses leave the chunk; the rest is dropped with the carry.
        return TokenCarry(lm_loss=c.lm_loss.detach(), mtp_loss=mtp, loss=loss)

    # Bookkeeping.
    def moe_layers(self) -> list:
        layers = list(self.layers.values()) + ([m.layer for m in self.mtp] if self.is_last else [])
        return [layer.mlp for layer in layers if layer.is_moe]


def _full_shape(param: torch.Tensor, coords) -> tuple[int, ...]:
    m, shape = meta(param), list(param.shape)
    if m.expert:
        shape[0] *= coords.get("ep", (0, 1))[1]
    if m.shard_dim is not None:
        shape[m.shard_dim] *= coords.get(m.shard_group, (0, 1))[1]
        if m.full_size is not None:
            shape[m.shard_dim] = m.full_size
    return tuple(shape)


@torch.no_grad()
def initialize(module: nn.Module, seed: int, init_std: float, coords=None) -> None:
    """Initialise every parameter from its global name and ``seed`` alone: each
    full tensor is drawn from a generator seeded by (seed, name) and this rank
    keeps its shard. Any layout (and the single-rank model) gets the same weights."""
    coords = coords or {}
    for name, param in module.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.randn(_full_shape(param, coords), generator=gen) * init_std
        param.copy_(shard_tensor(full, meta(param), coords, name))

"""FP8 dispatch payloads: what travels toward the experts travels as FP8 tiles.

DeepSeek-V3 quantizes the activation entering the MoE up-projection before
the dispatch (report §3.3.3), so the all-to-all carries FP8 data with one
fp32 scale per 1x128 tile, and the receiving experts' Fprop uses those tiles
as they arrive. It does the same with the activation gradient entering the
experts' down projection, which travels toward the experts in the backward
(the combine's transpose). The combine itself and the dispatch's backward
(the expert input's gradient, on its way back to the tokens) stay in the
high-precision dtype.

:class:`FP8PayloadOp` wraps a dispatcher's exchange (one- or two-level, or
none for ep=1): it quantizes the hidden part of each sent row, packs the fp8
bytes, the scales' bytes and the gates (in the rows' dtype) into one uint8
row, exchanges that, and on arrival unpacks it. The received tiles go to the
plan (``DispatchPlan.received_tiles``) for the experts; the exchange's result
keeps its usual shape ``[N, H + k]`` with the hidden part dequantized (what a
receiver holding only the payload knows), so the runtime, the gates and the
backward see the same rows as without FP8. Quantizing is per row, so doing
it before the exchange equals doing it after (``on_wire=False``, kept for
comparison): the exchange only moves bits. :class:`FP8GradientOp` wraps the
combine alike: its forward is the inner combine's, its transpose sends the
output gradient's rows as FP8 tiles and hands on their dequantized values.
"""
from __future__ import annotations

from typing import Optional

import torch

from mtrain.model.fp8 import BLOCK, FP8_DTYPE, dequantize_tiles, quantize_tiles
from mtrain.runtime.comm import CommOp, Pending

SCALE_BYTES = 4  # one fp32 scale per 1x128 tile


def payload_row_bytes(hidden: int, topk: int, dtype: torch.dtype, fp8: bool) -> int:
    """Bytes of one dispatched row: hidden state and ``topk`` gates (in ``dtype``),
    the hidden state as fp8 data plus its fp32 1x128 scales when ``fp8``."""
    size = torch.empty(0, dtype=dtype).element_size()
    if not fp8:
        return (hidden + topk) * size
    return hidden + hidden // BLOCK * SCALE_BYTES + topk * size


def encode(data: torch.Tensor, scales: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp8 ``[P, H]``, fp32 scales ``[P, H / 128]`` and gates ``[P, k]`` (if any) -> one uint8 row each."""
    parts = [data.contiguous().view(torch.uint8), scales.contiguous().view(torch.uint8)]
    if gates is not None:
        parts.append(gates.contiguous().view(torch.uint8))
    return torch.cat(parts, 1)


def decode(payload: torch.Tensor, hidden: int, topk: int, dtype: torch.dtype):
    """Inverse of :func:`encode`: (fp8 data, fp32 scales, gates in ``dtype``; None when ``topk`` is 0)."""
    scale_bytes = hidden // BLOCK * SCALE_BYTES
    data, scales, gates = payload.split([hidden, scale_bytes, payload.shape[1] - hidden - scale_bytes], 1)
    gates = gates.contiguous().view(dtype).reshape(-1, topk) if topk else None
    return data.contiguous().view(FP8_DTYPE), scales.contiguous().view(torch.float32), gates


class FP8PayloadOp(CommOp):
    """``inner`` with the rows' hidden part sent as FP8 tiles (see the module doc).

    ``start`` takes and returns rows ``[*, H + k]`` in the model dtype and sets
    ``plan.received_tiles``; ``start_transpose`` (the backward) is ``inner``'s,
    in high precision. ``row_bytes``: the width in bytes of the rows that went
    to ``inner`` in the last exchange (what each sent row costs on the wire).
    """

    def __init__(self, inner: CommOp, plan, on_wire: bool = True):
        self.inner, self.plan, self.on_wire = inner, plan, on_wire
        self.row_bytes: Optional[int] = None

    def start(self, rows: torch.Tensor) -> Pending:
        k = self.plan.topk
        hidden, dtype = rows.shape[1] - k, rows.dtype
        if self.on_wire:
            data, scales = quantize_tiles(rows[:, :hidden])
            payload = encode(data, scales, rows[:, hidden:])
            self.row_bytes = payload.shape[1]
            return self.inner.start(payload).then(lambda got: self._arrived(*decode(got, hidden, k, dtype)))
        self.row_bytes = rows.shape[1] * rows.element_size()
        return self.inner.start(rows).then(lambda got: self._arrived(*quantize_tiles(got[:, :hidden]),
                                                                     got[:, hidden:]))

    def _arrived(self, data: torch.Tensor, scales: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        self.plan.received_tiles = (data, scales)
        return torch.cat([dequantize_tiles(data, scales).to(gates.dtype), gates], 1)

    def start_transpose(self, grad: torch.Tensor) -> Pending:
        return self.inner.start_transpose(grad)


class FP8GradientOp(CommOp):
    """The combine ``inner`` with its transpose's rows sent as FP8 tiles: the
    gradient of the expert outputs' per-token sums, on its way to the experts
    (whose down projection quantizes it for Dgrad anyway). ``start`` is
    ``inner``'s, in high precision; ``start_transpose`` takes and returns
    rows in the gradient's dtype, holding the dequantized tiles.
    ``row_bytes``: the width in bytes of the rows of the last transpose."""

    def __init__(self, inner: CommOp, on_wire: bool = True):
        self.inner, self.on_wire = inner, on_wire
        self.row_bytes: Optional[int] = None

    def start(self, rows: torch.Tensor) -> Pending:
        return self.inner.start(rows)

    def start_transpose(self, grad: torch.Tensor) -> Pending:
        hidden, dtype = grad.shape[1], grad.dtype
        if not self.on_wire:
            self.row_bytes = hidden * grad.element_size()
            return self.inner.start_transpose(grad).then(
                lambda got: dequantize_tiles(*quantize_tiles(got)).to(dtype))
        payload = encode(*quantize_tiles(grad))
        self.row_bytes = payload.shape[1]
        return self.inner.start_transpose(payload).then(
            lambda got: dequantize_tiles(*decode(got, hidden, 0, dtype)[:2]).to(dtype))

"""Megatron-style train / valid / test split of an indexed dataset, by documents.

A split is three shares, ``"98,1,1"`` (``98/1/1`` reads the same and needs no
quoting on a Hydra command line; missing shares are 0), normalised by their
sum. With ``n`` documents the parts are the document ranges between the
boundaries ``0 = b0 <= b1 <= b2 <= b3 = n``, ``b_k`` the cumulative share of
the first ``k`` parts times ``n``, rounded half up. The documents of a part
lie back to back in the flat token stream, so a part is one token range
``[offsets[b_k], offsets[b_k+1])``; samples drawn inside it never reach
another part's tokens. The split depends only on the shares and the
document count: deterministic, and the same on every rank.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

from mtrain.data.indexed import IndexedDataset

PARTS = ("train", "valid", "test")
_SEPARATORS = re.compile(r"[,/]")


def parse_split(text, key: str = "eval.split") -> tuple[float, float, float]:
    """The three shares of ``text`` (a string, or a list of numbers); ValueError naming ``key`` and the fix."""
    items = list(text) if isinstance(text, (list, tuple)) else _SEPARATORS.split(str(text))
    hint = f"give up to three non-negative shares of train,valid,test such as {key}=98/1/1"
    if not 1 <= len(items) <= len(PARTS):
        raise ValueError(f"{key}={text!r} has {len(items)} parts; {hint}")
    try:
        shares = [float(str(item).strip()) for item in items]
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a list of numbers; {hint}") from None
    if any(not math.isfinite(s) or s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"{key}={text!r} needs finite shares >= 0 with a positive sum; {hint}")
    shares += [0.0] * (len(PARTS) - len(shares))
    return tuple(s / sum(shares) for s in shares)


def split_errors(text, key: str = "eval.split") -> list[str]:
    """[] for a usable split (or none), else the one message of :func:`parse_split`."""
    if text is None:
        return []
    try:
        parse_split(text, key)
    except ValueError as e:
        return [str(e)]
    return []


def document_bounds(shares: Sequence[float], num_docs: int) -> list[int]:
    """The boundaries ``[0, b1, b2, num_docs]`` of the parts (documents ``[b_k, b_k+1)``)."""
    bounds, total = [0], 0.0
    for share in shares[:-1]:
        total += share
        bounds.append(min(num_docs, max(bounds[-1], math.floor(total * num_docs + 0.5))))
    return bounds + [num_docs]


def part_token_range(indexed: IndexedDataset, split, part: str,
                     key: str = "eval.split") -> Optional[tuple[int, int]]:
    """The token range ``[start, end)`` of ``part`` of ``indexed`` under ``split``
    (None: no split, the whole stream); ValueError when the part has no document."""
    if split is None:
        return None
    bounds = document_bounds(parse_split(split, key), len(indexed))
    k = PARTS.index(part)
    first, last = bounds[k], bounds[k + 1]
    if first == last:
        raise ValueError(f"{key}={split!r} leaves the {part} part of {indexed.prefix} without documents "
                         f"({len(indexed)} documents, parts {bounds}): raise its share")
    return int(indexed.offsets[first]), int(indexed.offsets[last])

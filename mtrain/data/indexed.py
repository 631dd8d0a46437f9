"""Indexed token datasets: many documents of token ids in one memory-mapped file.

``<prefix>.bin`` holds every document's token ids back to back (uint16 when the
vocabulary fits, else int32). ``<prefix>.idx`` holds a fixed header followed by
the document offsets (int64, ``n_docs + 1`` entries, in tokens):

    magic    8 bytes   b"MTRNIDX\\0"
    version  uint32    1
    dtype    uint32    1 = uint16, 2 = int32
    vocab    uint64    vocabulary size the ids were written for
    n_docs   uint64
    offsets  int64[n_docs + 1]

The writer produces both files under temporary names and renames them at the
end, the ``.idx`` last, so a dataset is visible under its real prefix only once
it is complete.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

MAGIC = b"MTRNIDX\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class CorruptDatasetError(ValueError):
    """An indexed dataset's files are missing, truncated or not of this format."""


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return _DTYPES[1] if vocab_size <= 65536 else _DTYPES[2]


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


class IndexedDatasetWriter:
    """Append documents, then ``finalize()`` to publish ``<prefix>.bin/.idx``.

    Usable as a context manager: leaving the block normally finalizes, an
    exception removes the temporary files instead.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.prefix = os.fspath(prefix)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}-{id(self):x}"
        self._tmp_bin = Path(f"{bin_path(self.prefix)}{suffix}")
        self._tmp_idx = Path(f"{idx_path(self.prefix)}{suffix}")
        self._bin = open(self._tmp_bin, "wb")
        self._offsets: list[int] = [0]
        self._closed = False

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        if self._closed:
            raise RuntimeError("add_document after finalize/abort")
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document is a 1-d sequence of ids, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + int(arr.size))

    def finalize(self) -> None:
        if self._closed:
            raise RuntimeError("finalize called twice")
        self._closed = True
        self._bin.close()
        header = _HEADER.pack(MAGIC, VERSION, _DTYPE_CODES[self.dtype], self.vocab_size, self.num_documents)
        with open(self._tmp_idx, "wb") as f:
            f.write(header)
            f.write(np.asarray(self._offsets, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        # The .idx is the commit marker: a reader never sees a new .idx next to an old .bin.
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            path.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Read-only view of ``<prefix>.bin/.idx``; token ids stay memory-mapped."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        idx, bin_ = idx_path(self.prefix), bin_path(self.prefix)
        for path in (idx, bin_):
            if not path.is_file():
                raise FileNotFoundError(f"indexed dataset file {path} not found")
        self.vocab_size, self.dtype, self.offsets = _read_index(idx)
        expected = int(self.offsets[-1]) * self.dtype.itemsize
        actual = bin_.stat().st_size
        if actual != expected:
            raise CorruptDatasetError(
                f"{bin_} has {actual} bytes but {idx} describes {int(self.offsets[-1])} tokens "
                f"of {self.dtype} ({expected} bytes); the .bin is truncated or does not belong to this .idx")
        if expected == 0:
            self._tokens = np.empty(0, dtype=self.dtype)  # numpy cannot memory-map an empty file
        else:
            self._tokens = np.memmap(bin_, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        i %= len(self)
        return self._tokens[self.offsets[i]:self.offsets[i + 1]]

    def tokens(self, start: int, length: int) -> np.ndarray:
        """``length`` ids of the flat token stream (all documents concatenated) from ``start``."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the stream of {self.num_tokens} tokens")
        ids = self._tokens[start:start + length]
        # Checked on every read (one pass over a sample): a damaged .bin of the right size
        # would otherwise surface as an embedding's "index out of range" far from its cause.
        if ids.size and ids.max() >= self.vocab_size:
            at = start + int(np.argmax(ids >= self.vocab_size))
            raise CorruptDatasetError(
                f"{bin_path(self.prefix)}: token id {int(self._tokens[at])} at token offset {at} (byte "
                f"{at * self.dtype.itemsize}) is outside the vocabulary of {self.vocab_size} ids its .idx records; "
                f"the file is damaged or from another tokenizer: re-run mtrain's preprocessing")
        return ids


def _read_index(path: Path) -> tuple[int, np.dtype, np.ndarray]:
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise CorruptDatasetError(f"{path} is {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, dtype_code, vocab_size, n_docs = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptDatasetError(f"{path} does not start with the magic bytes {MAGIC!r} (found {magic!r}); "
                                  "it is not an mtrain indexed dataset")
    if version != VERSION:
        raise CorruptDatasetError(f"{path} has format version {version}; this reader supports {VERSION}")
    if dtype_code not in _DTYPES:
        raise CorruptDatasetError(f"{path} has unknown dtype code {dtype_code}")
    expected = _HEADER.size + 8 * (n_docs + 1)
    if len(data) != expected:
        raise CorruptDatasetError(f"{path} is {len(data)} bytes; a header with {n_docs} documents "
                                  f"needs {expected}; the index is truncated")
    offsets = np.frombuffer(data, dtype=np.int64, offset=_HEADER.size)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise CorruptDatasetError(f"{path} holds offsets that do not start at 0 or decrease")
    return int(vocab_size), _DTYPES[dtype_code], offsets

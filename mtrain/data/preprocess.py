"""Turn text files into an indexed dataset: tokenize each document and append EOS.

Inputs: a ``.txt`` file is one document; a ``.jsonl`` file holds one document
per line, its text under ``json_key``. Documents keep their input order
whatever the number of workers.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from mtrain.data.indexed import IndexedDatasetWriter
from mtrain.data.tokenizer import Tokenizer

# Documents sent to a worker at a time: large enough to amortise the pickling.
_CHUNK_DOCS = 64


def tokenizer_path(prefix: str | os.PathLike) -> Path:
    """Where the tokenizer that produced ``<prefix>.bin/.idx`` is kept, when it was trained for it."""
    return Path(f"{os.fspath(prefix)}.tokenizer.json")


def iter_documents(inputs: Sequence[str | os.PathLike], json_key: str = "text") -> Iterator[str]:
    for path in map(Path, inputs):
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if json_key not in record:
                        raise KeyError(f"{path}:{line_no} has no key {json_key!r} (keys: {sorted(record)}); "
                                       "pick the text field with --json-key")
                    yield record[json_key]
        else:
            raise ValueError(f"{path}: unsupported input type {path.suffix!r}; use .txt or .jsonl")


@dataclass
class PreprocessSummary:
    documents: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"{self.documents} documents, {self.tokens} tokens (EOS included) in {self.seconds:.2f} s, "
                f"{self.tokens_per_second:,.0f} tokens/s")


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := list(islice(it, size)):
        yield chunk


def write_indexed_dataset(docs: Iterable[str], output_prefix: str | os.PathLike, tokenizer: Tokenizer,
                          workers: int = 1, progress: bool = True) -> PreprocessSummary:
    """Tokenize ``docs`` (EOS appended to each) into ``<output_prefix>.bin/.idx``."""
    start = time.perf_counter()
    chunks = _chunks(docs, _CHUNK_DOCS)
    with IndexedDatasetWriter(output_prefix, tokenizer.vocab_size) as writer, \
            tqdm(unit="doc", desc="tokenizing", disable=not progress) as bar:
        if workers > 1:
            # The parent forks after using the tokenizer: keep the Rust thread pool off in workers.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.to_str(),)) as pool:
                encoded_chunks: Iterable[list[list[int]]] = pool.imap(_encode_chunk, chunks)
                _write_chunks(encoded_chunks, writer, tokenizer.eos_id, bar)
        else:
            _write_chunks(map(tokenizer.encode_batch, chunks), writer, tokenizer.eos_id, bar)
        documents, tokens = writer.num_documents, writer.num_tokens
    return PreprocessSummary(documents, tokens, time.perf_counter() - start)


def _write_chunks(encoded_chunks: Iterable[list[list[int]]], writer: IndexedDatasetWriter, eos_id: int,
                  bar: tqdm) -> None:
    for encoded in encoded_chunks:
        for ids in encoded:
            ids.append(eos_id)
            writer.add_document(ids)
        bar.update(len(encoded))

"""The built-in demo corpus: the Python standard library's own sources.

Every CPython 3.10+ install ships its standard library as ``.py`` files, so the
corpus is available offline everywhere. The top-level modules are read in
sorted file-name order, one document per module, until ``max_bytes`` of text;
the content therefore depends only on the Python version.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from mtrain.data.preprocess import tokenizer_path, write_indexed_dataset
from mtrain.data.tokenizer import Tokenizer

DEFAULT_MAX_BYTES = 4_000_000
# Bump when the way the demo dataset is built changes, so old caches are not reused.
_FORMAT = 1
_DATASET_NAME = "demo"


def demo_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """Standard-library module sources in sorted order, at most ``max_bytes`` of UTF-8 in total."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        docs.append(text)
        total += size
    if not docs:
        raise RuntimeError(f"no standard-library sources under {stdlib} fit in {max_bytes} bytes")
    return docs


def demo_dataset_dir(cache_dir: str | os.PathLike, vocab_size: int, max_bytes: int) -> Path:
    """Cache folder of one demo build; its name holds everything the content depends on."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(cache_dir) / f"demo-v{_FORMAT}-{version}-vocab{vocab_size}-{max_bytes}B"


def ensure_demo_dataset(cache_dir: str | os.PathLike, vocab_size: int = 1024,
                        max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Build the demo dataset once under ``cache_dir``; return its prefix.

    The tokenizer lies beside it as ``<prefix>.tokenizer.json``. Concurrent
    callers each build in a private temporary folder and publish it with one
    atomic rename; whoever loses the race discards its copy and uses the winner's.
    """
    final_dir = demo_dataset_dir(cache_dir, vocab_size, max_bytes)
    prefix = str(final_dir / _DATASET_NAME)
    if final_dir.is_dir():
        return prefix
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        _build(tmp_dir / _DATASET_NAME, vocab_size, max_bytes)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not final_dir.is_dir():
                raise
            print(f"demo dataset: another process finished {final_dir} first; using it", flush=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return prefix


def _build(prefix: Path, vocab_size: int, max_bytes: int) -> None:
    start = time.perf_counter()
    docs = demo_documents(max_bytes)
    print(f"demo dataset: {len(docs)} standard-library modules, "
          f"{sum(len(d) for d in docs) / 1e6:.1f} M characters", flush=True)
    print(f"demo dataset: training a byte-level BPE tokenizer (vocab {vocab_size})", flush=True)
    tokenizer = Tokenizer.train(docs, vocab_size)
    tokenizer.save(tokenizer_path(prefix))
    summary = write_indexed_dataset(tqdm(docs, desc="demo dataset: tokenizing", unit="doc", leave=False),
                                    prefix, tokenizer, progress=False)
    print(f"demo dataset: {summary}; built in {time.perf_counter() - start:.1f} s", flush=True)

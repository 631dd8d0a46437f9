import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrain.data import (CorruptDatasetError, DataPosition, GPTDataset, IndexedDataset, IndexedDatasetWriter,
                         StepLoader, Tokenizer, batch_for_step, ensure_demo_dataset, epoch_permutation,
                         rank_sample_indices, tokenizer_path)
from mtrain.data.indexed import bin_path, dataset_exists, idx_path

REPO = Path(__file__).resolve().parents[2]
PREPROCESS = REPO / "tools" / "preprocess_data.py"


def random_docs(rng: np.random.Generator, vocab_size: int, n: int = 20, max_len: int = 50) -> list[np.ndarray]:
    # Include empty documents: they are legal and exercise equal consecutive offsets.
    return [rng.integers(0, vocab_size, size=rng.integers(0, max_len)) for _ in range(n)]


def write_dataset(prefix, docs, vocab_size):
    with IndexedDatasetWriter(prefix, vocab_size) as writer:
        for doc in docs:
            writer.add_document(doc)
    return IndexedDataset(prefix)


# ---- indexed dataset ----------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (65536, np.uint16), (200_000, np.int32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    docs = random_docs(np.random.default_rng(0), vocab_size)
    docs[3] = np.array([vocab_size - 1, 0])  # extremes of the id range survive the narrow dtype
    ds = write_dataset(tmp_path / "d", docs, vocab_size)
    assert ds.dtype == dtype and ds.vocab_size == vocab_size
    assert len(ds) == len(docs)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.doc(i), doc)
    flat = np.concatenate(docs)
    np.testing.assert_array_equal(ds.tokens(7, 100), flat[7:107])
    assert bin_path(tmp_path / "d").stat().st_size == flat.size * np.dtype(dtype).itemsize


def test_out_of_range_ids_rejected(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "d", 100)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        writer.add_document([5, 100])
    writer.abort()


def test_truncated_bin_is_detected(tmp_path):
    write_dataset(tmp_path / "d", [np.arange(10), np.arange(5)], 1000)
    path = bin_path(tmp_path / "d")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(CorruptDatasetError, match="truncated"):
        IndexedDataset(tmp_path / "d")


def test_garbage_ids_in_a_bin_of_the_right_size_are_named_with_file_and_offset(tmp_path):
    write_dataset(tmp_path / "d", [np.arange(10), np.arange(5)], 1000)
    path = bin_path(tmp_path / "d")
    data = bytearray(path.read_bytes())
    data[2 * 7:2 * 7 + 2] = (65000).to_bytes(2, "little")  # token 7 (uint16) now 65000
    path.write_bytes(bytes(data))
    ds = IndexedDataset(tmp_path / "d")
    assert ds.tokens(0, 7).tolist() == list(range(7))  # the damage is reported when read, not before
    with pytest.raises(CorruptDatasetError, match=r"d\.bin: token id 65000 at token offset 7 \(byte 14\).*1000 ids"):
        ds.tokens(4, 6)


def test_bad_magic_is_detected(tmp_path):
    write_dataset(tmp_path / "d", [np.arange(10)], 1000)
    path = idx_path(tmp_path / "d")
    path.write_bytes(b"XXXXXXXX" + path.read_bytes()[8:])
    with pytest.raises(CorruptDatasetError, match="magic"):
        IndexedDataset(tmp_path / "d")


def test_truncated_idx_is_detected(tmp_path):
    write_dataset(tmp_path / "d", [np.arange(10), np.arange(3)], 1000)
    path = idx_path(tmp_path / "d")
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CorruptDatasetError, match="truncated"):
        IndexedDataset(tmp_path / "d")


def test_unfinished_write_is_invisible(tmp_path):
    old = write_dataset(tmp_path / "d", [np.arange(4)], 1000)
    old_docs = len(old)
    writer = IndexedDatasetWriter(tmp_path / "d", 1000)
    writer.add_document(np.arange(7))
    writer.add_document(np.arange(9))
    # A crash here leaves only temporary files; the published dataset is the old one.
    assert len(IndexedDataset(tmp_path / "d")) == old_docs
    assert not dataset_exists(tmp_path / "new")
    fresh = IndexedDatasetWriter(tmp_path / "new", 1000)
    fresh.add_document(np.arange(3))
    assert not dataset_exists(tmp_path / "new")
    with pytest.raises(FileNotFoundError):
        IndexedDataset(tmp_path / "new")
    fresh.abort()
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "d", 1000) as writer:
            writer.add_document(np.arange(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---- GPT samples ---------------------------------------------------------------------------------

def gpt_dataset(tmp_path, seq_len=8, seed=3, n_docs=30):
    docs = random_docs(np.random.default_rng(1), 500, n=n_docs, max_len=20)
    ds = write_dataset(tmp_path / "g", docs, 500)
    return GPTDataset(ds, seq_len, seed), np.concatenate(docs)


def test_samples_are_the_flat_stream_shifted(tmp_path):
    data, flat = gpt_dataset(tmp_path)
    seq_len = data.seq_len
    assert data.samples_per_epoch == (flat.size - 1) // seq_len
    for g in range(2 * data.samples_per_epoch):
        inputs, targets = data[g]
        j = data.shuffled_index(g)
        assert inputs.dtype == targets.dtype == torch.int64
        np.testing.assert_array_equal(inputs.numpy(), flat[j * seq_len:j * seq_len + seq_len])
        np.testing.assert_array_equal(targets.numpy(), flat[j * seq_len + 1:j * seq_len + seq_len + 1])


def test_epoch_permutation_covers_every_sample_once(tmp_path):
    data, _ = gpt_dataset(tmp_path)
    n = data.samples_per_epoch
    for epoch in range(3):
        order = [data.shuffled_index(epoch * n + k) for k in range(n)]
        assert sorted(order) == list(range(n))
    first, second = ([data.shuffled_index(e * n + k) for k in range(n)] for e in (0, 1))
    assert first != second


def test_permutation_depends_on_seed_only():
    np.testing.assert_array_equal(epoch_permutation(100, 7, 2), epoch_permutation(100, 7, 2))
    assert not np.array_equal(epoch_permutation(100, 7, 2), epoch_permutation(100, 8, 2))
    # seed + epoch is not the key: (7, 3) and (8, 2) are different orders.
    assert not np.array_equal(epoch_permutation(100, 7, 3), epoch_permutation(100, 8, 2))


def test_iteration_matches_indexing(tmp_path):
    data, _ = gpt_dataset(tmp_path)
    it = iter(data)
    for g in range(data.samples_per_epoch + 5):
        inputs, _ = next(it)
        torch.testing.assert_close(inputs, data[g][0], rtol=0, atol=0)


def test_too_short_dataset_is_rejected(tmp_path):
    ds = write_dataset(tmp_path / "s", [np.arange(5)], 100)
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTDataset(ds, seq_len=8, seed=0)


def run_steps(loader: StepLoader, steps: int):
    return [loader.next_step() for _ in range(steps)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resume_continues_with_the_next_samples(tmp_path):
    data, _ = gpt_dataset(tmp_path)
    # Resuming after 7 steps of 2x3 samples starts inside the second epoch.
    assert 6 * 6 < data.samples_per_epoch < 7 * 6
    straight = run_steps(StepLoader(data, micro_batch=2, num_microbatches=3, dp_rank=0, dp_size=1), 10)

    first = StepLoader(data, micro_batch=2, num_microbatches=3, dp_rank=0, dp_size=1)
    before = run_steps(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    fresh_data = GPTDataset(data.indexed, data.seq_len, data.seed)
    resumed = StepLoader(fresh_data, micro_batch=2, num_microbatches=3, dp_rank=0, dp_size=1)
    resumed.load_state_dict(state)
    after = run_steps(resumed, 3)
    assert len(before + after) == len(straight)
    for step_a, step_b in zip(straight, before + after):
        assert_same_batches(step_a, step_b)


def test_dp_layouts_see_the_same_global_batch(tmp_path):
    data, _ = gpt_dataset(tmp_path)
    micro_batch, k = 2, 2
    position = DataPosition(5)
    single = batch_for_step(data, position, 2 * k * micro_batch, 0, 1, micro_batch, 2 * k)
    ranks = [batch_for_step(data, position, 2 * k * micro_batch, r, 2, micro_batch, k) for r in range(2)]
    assert_same_batches(single, ranks[0] + ranks[1])  # documented order: rank-major, then micro-batch
    for inputs, targets in single:
        assert inputs.shape == targets.shape == (micro_batch, data.seq_len)


def test_rank_sample_indices_partition_the_global_batch():
    position = DataPosition(100)
    indices = [rank_sample_indices(position, 24, r, 4, 3, 2) for r in range(4)]
    flat = [i for rank in indices for mb in rank for i in mb]
    assert flat == list(range(100, 124))
    with pytest.raises(ValueError, match="global_batch"):
        rank_sample_indices(position, 25, 0, 4, 3, 2)


# ---- tokenizer and preprocessing -------------------------------------------------------------------

TEXT = ("The quick brown fox jumps over the lazy dog. " * 20
        + "def add(a, b):\n    return a + b\n" * 10 + "Ünïcödé and emoji 🙂 survive byte-level BPE.\n")


def test_tokenizer_round_trip_and_determinism(tmp_path):
    tok = Tokenizer.train([TEXT], vocab_size=300)
    assert 256 + 2 <= tok.vocab_size <= 300
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    sample = "The lazy fox returns a + b; 🙂 \t unseen ωord"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert tok.eos_id not in ids
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox".encode())  # merges were learned
    tok.save(tmp_path / "a.json")
    Tokenizer.train([TEXT], vocab_size=300).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert Tokenizer.from_file(tmp_path / "a.json").encode(sample) == ids


def run_preprocess(*args):
    out = subprocess.run([sys.executable, str(PREPROCESS), "--no-progress", *map(str, args)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_cli_end_to_end(tmp_path, workers):
    records = [{"body": f"record number {i}: " + "spam and eggs " * i, "id": i} for i in range(7)]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    txt = tmp_path / "notes.txt"
    txt.write_text("A whole text file\nis a single document.\n")
    prefix = tmp_path / "out" / "corpus"
    out = run_preprocess("--input", jsonl, txt, "--json-key", "body", "--output-prefix", prefix,
                         "--train-tokenizer", "--vocab-size", 280, "--workers", workers)
    assert "8 documents" in out.stdout

    ds = IndexedDataset(prefix)
    tok = Tokenizer.from_file(tokenizer_path(prefix))
    expected = [r["body"] for r in records] + [txt.read_text()]
    assert len(ds) == len(expected)
    for i, text in enumerate(expected):
        doc = ds.doc(i).tolist()
        assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
        assert tok.decode(doc[:-1]) == text

    # Encoding with the saved tokenizer reproduces the same dataset.
    again = tmp_path / "again"
    run_preprocess("--input", jsonl, txt, "--json-key", "body", "--output-prefix", again,
                   "--tokenizer", tokenizer_path(prefix))
    assert bin_path(again).read_bytes() == bin_path(prefix).read_bytes()


def test_preprocess_cli_names_a_missing_json_key(tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"content": "x"}\n')
    out = subprocess.run([sys.executable, str(PREPROCESS), "--input", str(jsonl), "--output-prefix",
                          str(tmp_path / "o"), "--train-tokenizer", "--vocab-size", "300"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--json-key" in out.stderr
    assert not dataset_exists(tmp_path / "o")


# ---- demo corpus ----------------------------------------------------------------------------------

DEMO_BYTES = 150_000


def test_demo_dataset_builds_once(tmp_path, capsys):
    prefix = ensure_demo_dataset(tmp_path, vocab_size=1024, max_bytes=DEMO_BYTES)
    assert "demo dataset" in capsys.readouterr().out
    ds = IndexedDataset(prefix)
    tok = Tokenizer.from_file(tokenizer_path(prefix))
    assert ds.vocab_size == tok.vocab_size <= 1024
    assert sum(1 for i in range(len(ds)) if ds.doc(i)[-1] == tok.eos_id) == len(ds)
    assert 0 < len(tok.decode(ds.tokens(0, ds.num_tokens).tolist())) <= DEMO_BYTES + len(ds) * 20
    stamps = {p: p.stat().st_mtime_ns for p in Path(prefix).parent.iterdir()}

    assert ensure_demo_dataset(tmp_path, vocab_size=1024, max_bytes=DEMO_BYTES) == prefix
    assert capsys.readouterr().out == ""  # nothing rebuilt
    assert {p: p.stat().st_mtime_ns for p in Path(prefix).parent.iterdir()} == stamps
    assert [p.name for p in tmp_path.iterdir()] == [Path(prefix).parent.name]  # no temporary folders left


def _build_demo(cache_dir, queue):
    queue.put(ensure_demo_dataset(cache_dir, vocab_size=300, max_bytes=50_000))


def test_demo_dataset_concurrent_builders_agree(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_demo, args=(tmp_path, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    prefixes = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert prefixes[0] == prefixes[1]
    assert len(IndexedDataset(prefixes[0])) > 0
    assert [p.name for p in tmp_path.iterdir()] == [Path(prefixes[0]).parent.name]


def test_build_from_config_checks_the_vocabulary(tmp_path):
    from mtrain.config.schema import DataConfig
    from mtrain.data import build_gpt_dataset

    write_dataset(tmp_path / "d", [np.arange(50), np.arange(40)], 600)
    data = build_gpt_dataset(DataConfig(path=str(tmp_path / "d"), seq_len=16, seed=2), model_vocab_size=1024)
    assert (data.seq_len, data.seed, data.samples_per_epoch) == (16, 2, 89 // 16)
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_gpt_dataset(DataConfig(path=str(tmp_path / "d")), model_vocab_size=512)

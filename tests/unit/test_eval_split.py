"""Held-out data without processes: the document split (``eval.split``), the
training stream it leaves, the held-out batches, the config rules, and the
eval records of the reporter."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.config.schema import DataConfig, EvalConfig
from mtrain.data.build import build_gpt_dataset
from mtrain.data.gpt_dataset import GPTDataset, StepLoader
from mtrain.data.heldout import EvalBatches, build_heldout_dataset, find_tokenizer
from mtrain.data.indexed import IndexedDataset, IndexedDatasetWriter
from mtrain.data.split import document_bounds, parse_split, part_token_range
from mtrain.train.preflight import config_errors
from mtrain.train.reporting import Reporter, eval_json, eval_status_line

VOCAB, SEQ = 500, 8


def write_docs(prefix, n_docs: int = 200, seed: int = 1) -> IndexedDataset:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, VOCAB) as writer:
        for _ in range(n_docs):
            writer.add_document(rng.integers(0, VOCAB, rng.integers(5, 40)))
    return IndexedDataset(prefix)


def sample_tokens(data: GPTDataset, n: int) -> set:
    """The token positions (in the flat stream) of the first ``n`` global samples."""
    out = set()
    for g in range(n):
        j = data.shuffled_index(g)
        start = data.start + j * data.seq_len
        out.update(range(start, start + data.seq_len + 1))
    return out


# -- the split --------------------------------------------------------------------

def test_parse_split_forms_and_errors():
    assert parse_split("98,1,1") == pytest.approx((0.98, 0.01, 0.01))
    assert parse_split("98/1/1") == parse_split(" 98 , 1 , 1 ") == parse_split([98, 1, 1])
    assert parse_split("9,1") == pytest.approx((0.9, 0.1, 0.0))
    for bad, match in [("a,b,c", "not a list of numbers"), ("1,2,3,4", "has 4 parts"), ("0,0,0", "positive sum"),
                       ("-1,1,1", "shares >= 0"), ("nan,1,1", "finite")]:
        with pytest.raises(ValueError, match=match):
            parse_split(bad)


def test_document_bounds_round_cumulative_shares():
    assert document_bounds(parse_split("98,1,1"), 147) == [0, 144, 146, 147]
    assert document_bounds(parse_split("90,5,5"), 200) == [0, 180, 190, 200]
    assert document_bounds(parse_split("1,0,0"), 10) == [0, 10, 10, 10]
    for n in range(0, 60):  # always ordered and complete
        b = document_bounds(parse_split("3,2,1"), n)
        assert b[0] == 0 and b[-1] == n and b == sorted(b)


def test_train_and_valid_are_disjoint_and_cover_their_shares(tmp_path):
    indexed = write_docs(tmp_path / "d")
    split = "80,10,10"
    train = GPTDataset(indexed, SEQ, 3, part_token_range(indexed, split, "train"))
    valid = GPTDataset(indexed, SEQ, 3, part_token_range(indexed, split, "valid"))
    test = GPTDataset(indexed, SEQ, 3, part_token_range(indexed, split, "test"))
    bounds = document_bounds(parse_split(split), len(indexed))
    assert bounds == [0, 160, 180, 200]
    assert (train.start, train.end) == (0, int(indexed.offsets[160]))
    assert (valid.start, valid.end) == (int(indexed.offsets[160]), int(indexed.offsets[180]))
    assert test.end == indexed.num_tokens
    # Every sample of a part stays inside it: no token of another part is read, in any epoch.
    train_tokens = sample_tokens(train, 3 * train.samples_per_epoch)
    valid_tokens = sample_tokens(valid, valid.samples_per_epoch)
    assert max(train_tokens) < train.end and min(valid_tokens) >= valid.start and max(valid_tokens) < valid.end
    assert not train_tokens & valid_tokens
    # The parts hold their shares of the tokens (documents differ in length: within a few %).
    share = (valid.end - valid.start) / indexed.num_tokens
    assert 0.05 < share < 0.15
    assert train.samples_per_epoch == (train.end - 1) // SEQ
    # Deterministic: the same split and seed give the same samples.
    again = GPTDataset(IndexedDataset(tmp_path / "d"), SEQ, 3, part_token_range(indexed, split, "train"))
    for g in (0, 5, train.samples_per_epoch + 2):
        assert all(torch.equal(a, b) for a, b in zip(train[g], again[g]))
        assert torch.equal(train[g][0], torch.from_numpy(train.sample_tokens(train.shuffled_index(g))[:-1]
                                                         .astype(np.int64)))


def test_no_split_is_the_whole_stream_as_before(tmp_path):
    indexed = write_docs(tmp_path / "d", n_docs=50)
    whole, plain = GPTDataset(indexed, SEQ, 3, part_token_range(indexed, None, "train")), GPTDataset(indexed, SEQ, 3)
    assert (whole.start, whole.end, whole.samples_per_epoch) == (0, indexed.num_tokens, plain.samples_per_epoch)
    assert all(torch.equal(whole[g][0], plain[g][0]) for g in range(20))


def test_an_empty_part_is_named(tmp_path):
    indexed = write_docs(tmp_path / "d", n_docs=20)
    with pytest.raises(ValueError, match="leaves the valid part .* without documents"):
        part_token_range(indexed, "99,1,0", "valid")


def test_resume_on_the_train_part_continues_exactly(tmp_path):
    write_docs(tmp_path / "d")
    data = build_gpt_dataset(DataConfig(path=str(tmp_path / "d"), seq_len=SEQ, seed=2), VOCAB, split="90,5,5")

    def steps(loader, n):
        return [loader.next_step() for _ in range(n)]

    straight = steps(StepLoader(data, 2, 3, 0, 1), 8)
    first = StepLoader(data, 2, 3, 0, 1)
    before = steps(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"consumed_samples": 30}  # the position is global samples, as without a split
    again = build_gpt_dataset(DataConfig(path=str(tmp_path / "d"), seq_len=SEQ, seed=2), VOCAB, split="90,5,5")
    resumed = StepLoader(again, 2, 3, 0, 1)
    resumed.load_state_dict(state)
    for a, b in zip(straight, before + steps(resumed, 3)):
        assert all(torch.equal(x, y) for (xa, ya), (xb, yb) in zip(a, b) for x, y in ((xa, xb), (ya, yb)))


# -- held-out batches -------------------------------------------------------------

def test_heldout_batches_are_the_same_on_any_dp_and_name_a_shortfall(tmp_path):
    write_docs(tmp_path / "d")
    data_cfg = DataConfig(path=str(tmp_path / "d"), seq_len=SEQ, seed=2)
    held = build_heldout_dataset(data_cfg, EvalConfig(split="80,10,10"), VOCAB)
    valid = build_gpt_dataset(data_cfg, VOCAB, split="80,10,10", part="valid")
    assert (held.start, held.end) == (valid.start, valid.end)
    assert build_heldout_dataset(data_cfg, EvalConfig(), VOCAB) is None
    other = build_heldout_dataset(data_cfg, EvalConfig(path=str(tmp_path / "d")), VOCAB)
    assert (other.start, other.end) == (0, other.indexed.num_tokens)

    one = EvalBatches(held, 3, 2, 4, 0, 1)
    two = [EvalBatches(held, 3, 2, 2, r, 2) for r in range(2)]
    for k in range(3):
        assert len(one.batch(k)) == 4
        merged = two[0].batch(k) + two[1].batch(k)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(one.batch(k), merged))
    assert torch.equal(one.batch(0)[0][0], torch.stack([held[0][0], held[1][0]]))
    assert one.samples == 24
    with pytest.raises(ValueError, match=r"eval.steps=100 .* holds \d+ samples"):
        EvalBatches(held, 100, 2, 4, 0, 1)


def test_tokenizer_is_found_beside_the_dataset_or_named(tmp_path):
    write_docs(tmp_path / "d")
    tok, path = find_tokenizer(DataConfig(path=str(tmp_path / "d")), VOCAB)
    assert tok is None and path.name == "d.tokenizer.json"
    tok, path = find_tokenizer(DataConfig(path=str(tmp_path / "d"), tokenizer="/nowhere/t.json"), VOCAB)
    assert tok is None and str(path) == "/nowhere/t.json"


# -- config rules -----------------------------------------------------------------

def test_eval_config_errors_reported_together():
    errors = config_errors(load_config(["eval.interval=-1", "eval.steps=0", "eval.split=a/b",
                                        "eval.prompt=hi", "eval.sample_tokens=0"]))
    assert any("eval.interval=-1 must be >= 0" in e for e in errors)
    assert any("eval.steps=0 must be at least 1" in e for e in errors)
    assert any("eval.split='a/b' is not a list of numbers" in e for e in errors)
    assert any("eval.sample_tokens=0 must be at least 1" in e for e in errors)
    assert config_errors(load_config(["eval.interval=5"])) == [
        "eval.interval=5 evaluates held-out data, but none is held out: set eval.split=98/1/1 (documents of "
        "data.path) or eval.path=<indexed dataset prefix>, or eval.interval=0"]
    assert any("holds no documents out for validation" in e
               for e in config_errors(load_config(["eval.interval=5", "eval.split=100/0/0"])))
    assert config_errors(load_config(["eval.interval=5", "eval.split=98/1/1", "eval.prompt=def"])) == []
    assert config_errors(load_config([])) == []  # the default: nothing held out, nothing evaluated


# -- reporting --------------------------------------------------------------------

RECORD = {"kind": "eval", "step": 4, "source": "valid", "lm_loss": 4.5, "ppl": math.exp(4.5), "mtp_loss": 4.75,
          "samples": 8, "tokens": 256, "eval_time_s": 0.25, "sample": {"prompt": "def", "completion": " f():", "tokens": 3}}


def test_eval_records_in_metrics_jsonl_and_the_console(tmp_path):
    cfg = load_config(["logging.wandb=false", "logging.progress=false", "train.steps=10"])
    stream = io.StringIO()
    reporter = Reporter(tmp_path, cfg, stream=stream)
    step = {"step": 4, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "tflops_per_device": 0.0,
            "peak_memory_gb": 0.1, "step_time_s": 0.1}
    for s in (4, 5):
        reporter.log({**step, "step": s})
        reporter.log_eval({**RECORD, "step": s, "lm_loss": float("nan") if s == 5 else 4.5})
    reporter.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("kind")) for r in lines] == [(4, None), (4, "eval"), (5, None), (5, "eval")]
    assert lines[1] == RECORD and lines[3]["lm_loss"] is None  # strict JSON
    assert "eval step 4 (valid) | lm loss 4.5000 | ppl 90.02 | mtp loss 4.7500 | 8 samples (256 tokens)" \
        in stream.getvalue()
    assert "sample: 'def f():'" in stream.getvalue()
    # A resume at step 4 keeps that step's evaluation, drops the later lines.
    Reporter(tmp_path, cfg, start_step=4, stream=io.StringIO()).close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("kind")) for r in kept] == [(4, None), (4, "eval")]


def test_eval_json_and_status_line_handle_a_diverged_loss():
    record = eval_json({**RECORD, "lm_loss": float("inf"), "ppl": float("inf")})
    assert record["lm_loss"] is None and record["ppl"] is None
    assert "lm loss nan | ppl nan" in eval_status_line(record)


def test_eval_scalars_in_tensorboard_and_a_bar_on_a_terminal(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    cfg = load_config(["logging.wandb=false", "logging.progress=true", "logging.tensorboard=true", "train.steps=4"])
    reporter = Reporter(tmp_path, cfg, stream=out)
    advance, close = reporter.eval_progress(3)
    for _ in range(3):
        advance(1)
    close()
    reporter.log_eval(RECORD)
    reporter.close()
    assert "eval:   0%|          | 0/3" in out.getvalue()  # a second bar (tqdm draws it at the start)
    assert "eval step 4 (valid) | lm loss 4.5000" in out.getvalue()  # written above the training bar
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/lm_loss")] == [(4, 4.5)]
    assert [e.value for e in events.Scalars("eval/ppl")] == pytest.approx([math.exp(4.5)])
    assert "eval/sample/text_summary" in events.Tags()["tensors"]

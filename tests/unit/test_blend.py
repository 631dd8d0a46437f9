"""data.blend: both config forms, named errors, proportions, exact resume and
determinism across processes. No process groups."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.config.schema import DataConfig
from mtrain.data import GPTDataset, IndexedDataset, IndexedDatasetWriter, StepLoader, build_gpt_dataset
from mtrain.data.batching import BatchRamp, BatchSchedule
from mtrain.data.blend import (BLOCK, BlendedDataset, BlendError, BlendIndex, blend_errors,
                               build_blended_dataset, parse_blend)
from mtrain.train.preflight import config_errors


def write(prefix, low, high, docs=30, length=40, vocab=1024, seed=0):
    """Documents of ids in [low, high): a sample's ids tell its source."""
    with IndexedDatasetWriter(prefix, vocab) as writer:
        for doc in np.random.default_rng(seed).integers(low, high, size=(docs, length)):
            writer.add_document(doc)
    return str(prefix)


@pytest.fixture
def sources(tmp_path):
    return write(tmp_path / "a", 0, 300), write(tmp_path / "b", 300, 600, docs=80), write(tmp_path / "c", 600, 1000)


def data_cfg(blend, **kw):
    return DataConfig(blend=blend, seq_len=kw.get("seq_len", 16), seed=kw.get("seed", 5))


# -- the two config forms --------------------------------------------------------

def test_string_and_list_forms_agree_and_weights_are_normalised():
    text = parse_blend("0.3 /data/a 0.7 /data/b")
    listed = parse_blend([{"path": "/data/a", "weight": 3}, {"path": "/data/b", "weight": 7}])
    assert text == listed
    assert [(e.path, e.name) for e in text] == [("/data/a", "a"), ("/data/b", "b")]
    assert [e.weight for e in text] == pytest.approx([0.3, 0.7])
    assert [(e.path, e.weight) for e in parse_blend("/data/only")] == [("/data/only", 1.0)]
    assert parse_blend(None) == [] and parse_blend("  ") == []
    named = parse_blend([{"path": "/x/corpus", "weight": 1, "name": "web"}, {"path": "/y/corpus", "weight": 1}])
    assert [e.name for e in named] == ["web", "corpus"]
    assert [e.name for e in parse_blend("1 /x/corpus 1 /y/corpus")] == ["corpus_0", "corpus_1"]


def test_both_forms_compose_from_the_command_line():
    text = load_config(["data.blend=0.3 /data/a 0.7 /data/b"])
    listed = load_config(["data.blend=[{path: /data/a, weight: 0.3}, {path: /data/b, weight: 0.7}]"])
    assert parse_blend(text.data.blend) == parse_blend(listed.data.blend)
    assert config_errors(text) == [] and config_errors(listed) == []


@pytest.mark.parametrize("spec, needles", [
    ("0.3 /a -0.7 /b", ["entry 2 (/b) has weight -0.7; weights must be positive"]),
    ("0 /a 1 /b", ["entry 1 (/a) has weight 0.0"]),
    ("x /a 1 /b", ["entry 1 (/a): weight 'x' is not a number"]),
    ("0.3 /a 0.7", ["has 3 items; it must alternate <weight> <prefix>"]),
    ([{"path": "/a", "weight": -1}, {"weight": 2}, {"path": "/c", "wieght": 1}],
     ["entry 1 (/a) has weight -1.0", "entry 2 ({'weight': 2}) has no path", "entry 3 has unknown keys ['wieght']"]),
    ([], ["lists no datasets"]),
    (f"1 /a {BLOCK * 2} /b", ["below 1/65536"]),
])
def test_parse_errors_name_every_problem(spec, needles):
    with pytest.raises(BlendError) as info:
        parse_blend(spec)
    text = "\n".join(info.value.errors)
    for needle in needles:
        assert needle in text, text


def test_config_errors_include_the_blend_and_refuse_it_beside_data_path():
    errors = config_errors(load_config(["data.blend=0.3 /a -1 /b", "data.path=/c", "model.topk_group=3"]))
    text = "\n".join(errors)
    assert "data.path=/c and data.blend are both set" in text
    assert "entry 2 (/b) has weight -1.0" in text and "model.topk_group=3" in text


def test_opening_names_every_missing_prefix_and_too_large_vocabulary(tmp_path, sources):
    a, b, _ = sources
    big = write(tmp_path / "big", 0, 10, vocab=5000)
    short = write(tmp_path / "short", 0, 10, docs=1, length=5)
    spec = f"1 {a} 1 {tmp_path / 'missing'} 1 {big} 1 {tmp_path / 'gone'} 1 {short}"
    with pytest.raises(BlendError) as info:
        build_gpt_dataset(data_cfg(spec), model_vocab_size=1024)
    text = "\n".join(info.value.errors)
    assert len(info.value.errors) == 4, text
    assert f"no indexed dataset at prefix {tmp_path / 'missing'}" in text and "missing.bin" in text
    assert f"no indexed dataset at prefix {tmp_path / 'gone'}" in text
    assert "data.blend dataset big" in text and "vocabulary of 5000 ids but model.vocab_size is 1024" in text
    assert "data.blend dataset short" in text and "fewer than one sample" in text


# -- proportions and positions ----------------------------------------------------

def test_proportions_follow_the_weights(sources):
    blend = build_blended_dataset(data_cfg(f"0.2 {sources[0]} 0.5 {sources[1]} 0.3 {sources[2]}"), 1024)
    for n in (10, 1000, 65536, 300_001):
        counts = blend.index.counts(n)
        assert sum(counts) == n
        for count, weight in zip(counts, (0.2, 0.5, 0.3)):
            assert abs(count - weight * n) <= 2 + n / BLOCK, (n, counts)
    # Any window of consecutive global samples holds each source near its share.
    sources_of = blend.index.pattern[np.arange(123_456, 123_456 + 5000) % BLOCK]
    for d, weight in enumerate((0.2, 0.5, 0.3)):
        assert abs(np.count_nonzero(sources_of == d) - weight * 5000) <= 2
    # Over many samples the ids show the same mix (sources use disjoint id ranges).
    firsts = np.array([int(blend[g][0][0]) for g in range(0, 6000)])
    shares = [np.mean((firsts >= lo) & (firsts < hi)) for lo, hi in ((0, 300), (300, 600), (600, 1000))]
    assert shares == pytest.approx([0.2, 0.5, 0.3], abs=0.01)


def test_each_source_is_read_in_its_own_order_without_gaps(sources):
    datasets = [GPTDataset(IndexedDataset(p), 16, 7 + d) for d, p in enumerate(sources)]
    blend = BlendedDataset(datasets, [1, 2, 3], block=64)
    taken = [0, 0, 0]
    for g in range(64 * 5 + 17):  # several blocks and a part
        d, j = blend.index.locate(g)
        assert j == taken[d]
        taken[d] += 1
        x, y = blend[g]
        assert torch.equal(x, datasets[d][j][0]) and torch.equal(y, datasets[d][j][1])
    assert taken == blend.index.counts(64 * 5 + 17)
    assert list(blend.source_counts(64 * 5 + 17).values()) == taken


def test_one_dataset_blend_is_the_plain_dataset(sources):
    blend = build_gpt_dataset(data_cfg(f"1 {sources[1]}"), 1024)
    plain = GPTDataset(IndexedDataset(sources[1]), 16, 5)
    for g in range(0, 3 * plain.samples_per_epoch, 7):
        assert torch.equal(blend[g][0], plain[g][0])


def test_summary_lines_count_what_the_run_draws(sources):
    blend = build_blended_dataset(data_cfg(f"1 {sources[0]} 3 {sources[1]}"), 1024)
    lines = blend.summary(1000)
    assert lines[0].startswith("a: weight 0.2500") and "250 of the run's 1000 samples" in lines[0]
    assert lines[1].startswith("b: weight 0.7500") and "750 of the run's 1000 samples" in lines[1]
    assert "samples per epoch" in lines[0] and "epochs)" in lines[0]


def test_blend_follows_a_split_of_each_source(sources):
    valid = build_gpt_dataset(data_cfg(f"1 {sources[0]} 1 {sources[1]}"), 1024, split="50,50,0", part="valid")
    for ds, src in zip(valid.datasets, sources):
        whole = IndexedDataset(src)
        assert ds.start == whole.offsets[len(whole) // 2] and ds.end == whole.num_tokens


# -- resume and determinism ---------------------------------------------------------

def run_steps(loader, steps):
    return [torch.cat([x for x, _ in loader.next_step()]) for _ in range(steps)]


def test_blend_resumes_exactly_on_another_layout(sources):
    spec = f"0.2 {sources[0]} 0.5 {sources[1]} 0.3 {sources[2]}"
    schedule = BatchSchedule(24, 2, 2, BatchRamp(8, 8, 40))
    straight = run_steps(StepLoader(build_gpt_dataset(data_cfg(spec), 1024), 2, 6, 0, 1,
                                    schedule=BatchSchedule(24, 2, 1, BatchRamp(8, 8, 40))), 12)
    first = [StepLoader(build_gpt_dataset(data_cfg(spec), 1024), 2, 6, r, 2, schedule=schedule) for r in range(2)]
    before = [torch.cat(step) for step in zip(*(run_steps(loader, 5) for loader in first))]
    state = json.loads(json.dumps(first[0].state_dict()))
    # Resumed in a fresh dataset (another process would build the same) at dp=1 with micro-batches of 4.
    resumed = StepLoader(build_gpt_dataset(data_cfg(spec), 1024), 4, 6, 0, 1,
                         schedule=BatchSchedule(24, 4, 1, BatchRamp(8, 8, 40)))
    resumed.load_state_dict(state)
    after = run_steps(resumed, 7)
    assert [len(s) for s in straight] == [8, 8, 8, 16] + [24] * 8  # 8 -> 24 by 8, one level per 20 samples
    for a, b in zip(straight, before + after):
        assert torch.equal(a, b)


DIGEST = """
import hashlib, sys
import numpy as np
from mtrain.config.schema import DataConfig
from mtrain.data import build_gpt_dataset
blend = build_gpt_dataset(DataConfig(blend=sys.argv[1], seq_len=16, seed=5), 1024)
h = hashlib.sha256()
h.update(np.array([blend.index.locate(g) for g in range(0, 400_000, 7)]).tobytes())
for g in range(0, 2000, 3):
    h.update(blend[g][0].numpy().tobytes())
print(h.hexdigest())
"""


def test_blend_is_the_same_in_another_process(sources):
    spec = f"0.2 {sources[0]} 0.5 {sources[1]} 0.3 {sources[2]}"
    out = subprocess.run([sys.executable, "-c", DIGEST, spec], capture_output=True, text=True, timeout=120,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    blend = build_gpt_dataset(data_cfg(spec), 1024)
    h = hashlib.sha256()
    h.update(np.array([blend.index.locate(g) for g in range(0, 400_000, 7)]).tobytes())
    for g in range(0, 2000, 3):
        h.update(blend[g][0].numpy().tobytes())
    assert out.stdout.strip() == h.hexdigest()


def test_index_refuses_bad_weights():
    with pytest.raises(ValueError, match="positive"):
        BlendIndex([1.0, 0.0])
    with pytest.raises(ValueError, match="no sample in a block"):
        BlendIndex([1.0, 1e-6], block=64)
    assert blend_errors(DataConfig()) == []

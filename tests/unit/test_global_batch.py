"""train.global_batch_size: derived micro-batch counts, their errors, the batch
ramp (sizes per step by hand), and the loader cutting each step's batch on any
dp. No processes."""
import json

import numpy as np
import pytest

from mtrain.planner.plan import make_plan
from mtrain.config.loading import load_config
from mtrain.data import GPTDataset, IndexedDataset, IndexedDatasetWriter, StepLoader
from mtrain.data.batching import BatchConfigError, BatchRamp, BatchSchedule, batch_schedule
from mtrain.pipeline.schedule_rules import microbatch_rule, schedule_errors
from mtrain.train.preflight import config_errors

DERIVED = ["parallel.num_microbatches=null"]
RAMP = ["train.batch_ramp.start_size=16", "train.batch_ramp.increment=16", "train.batch_ramp.ramp_samples=64"]


def errors_for(*overrides):
    return config_errors(load_config(list(overrides)))


def joined(*overrides):
    return "\n".join(errors_for(*overrides))


# -- derivation ----------------------------------------------------------------

def test_null_global_batch_keeps_the_hand_set_micro_batch_count():
    cfg = load_config()  # pp=2 DualPipe, dp=2, 4 micro-batches of 2
    schedule = batch_schedule(cfg.train, cfg.parallel, dp=2)
    assert (schedule.global_batch_size, schedule.num_microbatches, schedule.ramp) == (16, 4, None)
    # Both null: one micro-batch (the schema's old default).
    cfg = load_config(["parallel=single", "parallel.num_microbatches=null"])
    assert batch_schedule(cfg.train, cfg.parallel, dp=1).num_microbatches == 1


def test_global_batch_derives_the_micro_batches_per_rank_on_any_layout():
    cfg = load_config(DERIVED + ["train.global_batch_size=32"])
    assert errors_for(*DERIVED, "train.global_batch_size=32") == []
    for dp, mbs, count in ((2, 2, 8), (1, 2, 16), (4, 1, 8), (2, 4, 4)):
        cfg.train.micro_batch_size = mbs
        schedule = batch_schedule(cfg.train, cfg.parallel, dp)
        assert (schedule.global_batch_size, schedule.num_microbatches) == (32, count)
    # An explicit count that agrees is accepted.
    assert errors_for("train.global_batch_size=32", "parallel.num_microbatches=8") == []


def test_plan_reports_the_derived_count_and_the_ramp():
    plan = make_plan(load_config(DERIVED + ["train.global_batch_size=64"] + RAMP))
    assert plan["errors"] == []
    assert (plan["num_microbatches"], plan["global_batch_size"], plan["tokens_per_step"]) == (16, 64, 64 * 64)
    # 16 -> 64 by 16 over 64 samples (3 levels, one per 21 1/3 samples): 16, 16, 32, then 64 from 64 on.
    assert plan["batch_ramp"] == {"start_size": 16, "increment": 16, "ramp_samples": 64, "sizes": 4,
                                  "steps": 3, "samples": 64}
    assert [m["peak_inflight_microbatches"] for m in plan["memory"]] == [
        m["peak_inflight_microbatches"] for m in make_plan(load_config(["parallel.num_microbatches=16"]))["memory"]]


# -- errors --------------------------------------------------------------------

@pytest.mark.parametrize("overrides, needles", [
    (["train.global_batch_size=30"],
     ["train.global_batch_size=30 is not a multiple of train.micro_batch_size x dp = 2 x 2 = 4", "use 28 or 32"]),
    (["train.global_batch_size=32"],  # parallel/default.yaml sets num_microbatches=4
     ["parallel.num_microbatches=4 conflicts with train.global_batch_size=32",
      "= 8 micro-batches per data-parallel rank", "parallel.num_microbatches=null"]),
    (DERIVED + ["train.global_batch_size=0"], ["train.global_batch_size=0 must be at least 1"]),
    # DualPipe pp=2: an even count >= 4 per rank, i.e. batches that are multiples of 8 and at least 16.
    (DERIVED + ["train.global_batch_size=8"],
     ["train.global_batch_size=8 gives 2 micro-batches per data-parallel rank",
      "parallel.schedule=dualpipe with parallel.pp=2 needs an even number", "at least 4",
      "multiples of 8 and at least 16"]),
    (DERIVED + ["train.global_batch_size=20"], ["gives 5 micro-batches", "needs an even number"]),
    (DERIVED + ["parallel.schedule=dualpipev", "train.global_batch_size=12"],
     ["gives 3 micro-batches", "dualpipev with parallel.pp=2 needs at least 4 micro-batches"]),
])
def test_global_batch_errors_name_the_fields_and_the_fix(overrides, needles):
    text = joined(*overrides)
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize("ramp, needle", [
    (["train.batch_ramp.start_size=64"], "needs train.batch_ramp.increment and ramp_samples"),
    (["train.batch_ramp.increment=8"], "need train.batch_ramp.start_size"),
    (["train.batch_ramp.start_size=64", "train.batch_ramp.increment=16", "train.batch_ramp.ramp_samples=10"],
     "start_size=64 must be smaller than train.global_batch_size=64"),
    (["train.batch_ramp.start_size=16", "train.batch_ramp.increment=32", "train.batch_ramp.ramp_samples=10"],
     "64 - 16 = 48 is not a multiple of train.batch_ramp.increment=32"),
    (["train.batch_ramp.start_size=16", "train.batch_ramp.increment=0", "train.batch_ramp.ramp_samples=10"],
     "train.batch_ramp.increment=0 must be at least 1"),
    (["train.batch_ramp.start_size=18", "train.batch_ramp.increment=2", "train.batch_ramp.ramp_samples=10"],
     "start_size=18 and train.batch_ramp.increment=2 must be multiples of train.micro_batch_size x dp"),
    # Every size on the ramp meets DualPipe's rule (an even count >= 4 per rank): 8, 12, 16, ..., 64.
    (["train.batch_ramp.start_size=8", "train.batch_ramp.increment=4", "train.batch_ramp.ramp_samples=10"],
     "train.batch_ramp gives global batches whose micro-batch counts per data-parallel rank the schedule "
     "refuses: 8 (2), 12 (3), 20 (5), 28 (7), 36 (9), 44 (11) and 2 more"),
])
def test_ramp_errors(ramp, needle):
    text = joined(*DERIVED, "train.global_batch_size=64", *ramp)
    assert needle in text, text


def test_ramp_needs_a_global_batch_and_every_problem_is_reported_at_once():
    text = joined(*RAMP)
    assert "train.batch_ramp.start_size=16 needs train.global_batch_size" in text
    errors = errors_for(*DERIVED, "train.global_batch_size=30", "model.topk_group=3", "parallel.pp=3",
                        "train.batch_ramp.start_size=7", "train.batch_ramp.increment=1",
                        "train.batch_ramp.ramp_samples=5")
    text = "\n".join(errors)
    # The layout is wrong, so dp is unknown: its error and the others, not the batch's.
    assert "parallel.tp * parallel.pp" in text and "model.topk_group=3" in text and "even parallel.pp" in text
    assert "global_batch_size" not in text
    errors = errors_for(*DERIVED, "train.global_batch_size=30", "train.batch_ramp.start_size=7",
                        "train.batch_ramp.increment=2", "train.batch_ramp.ramp_samples=5", "model.topk_group=3")
    text = "\n".join(errors)
    for needle in ("train.global_batch_size=30 is not a multiple", "30 - 7 = 23 is not a multiple",
                   "start_size=7 and train.batch_ramp.increment=2 must be multiples", "model.topk_group=3"):
        assert needle in text, text


def test_schedule_rules_without_a_count_and_the_count_rule():
    assert schedule_errors("dualpipe", 3, None) == [e for e in schedule_errors("dualpipe", 3, 8) if "pp" in e]
    assert not any("num_microbatches" in e for e in schedule_errors("dualpipe", 2, None))
    assert microbatch_rule("dualpipe", 2) == (2, 4)
    assert microbatch_rule("dualpipev", 3) == (1, 6)
    assert microbatch_rule("1f1b", 4) == microbatch_rule("zb1p", 4) == (1, 1)


def test_batch_schedule_raises_every_problem():
    cfg = load_config(DERIVED + ["train.global_batch_size=30", "train.batch_ramp.start_size=64"])
    with pytest.raises(BatchConfigError) as info:
        batch_schedule(cfg.train, cfg.parallel, 2)
    assert len(info.value.errors) == 2


# -- the ramp ------------------------------------------------------------------

def test_ramp_sizes_per_step_by_hand():
    # 4 -> 16 by 4 over 24 samples: 3 levels, one per 8 samples.
    # step:     1  2  3   4   5   6
    # consumed: 0  4  8  16  28  44   (before the step)
    # level:    0  0  1   2   3   3   (floor(c * 3 / 24), capped at 3; c >= 24: full)
    schedule = BatchSchedule(16, 2, 2, BatchRamp(4, 4, 24))
    assert list(schedule.steps(6)) == [(0, 4), (4, 4), (8, 8), (16, 12), (28, 16), (44, 16)]
    assert [schedule.microbatches_at(c) for c, _ in schedule.steps(6)] == [1, 1, 2, 3, 4, 4]
    assert schedule.sizes() == [4, 8, 12, 16]
    assert schedule.ramp_steps() == (4, 28)
    assert [schedule.samples_after(n) for n in range(7)] == [0, 4, 8, 16, 28, 44, 60]
    assert schedule.global_batch_at(23) == 12 and schedule.global_batch_at(24) == 16


def test_ramp_of_deepseek_v3_shape():
    # 3072 -> 15360 sequences over 469B tokens of 4096: 114,501,953 samples (the increment is our choice).
    schedule = BatchSchedule(15360, 1, 64, BatchRamp(3072, 1536, 469_000_000_000 // 4096))
    assert schedule.sizes()[0] == 3072 and schedule.sizes()[-1] == 15360 and len(schedule.sizes()) == 9
    steps, samples = schedule.ramp_steps()
    assert samples >= 114_501_953 > samples - 15360
    walked, consumed = 0, 0
    while consumed < 114_501_953:
        consumed += schedule.global_batch_at(consumed)
        walked += 1
    assert (walked, consumed) == (steps, samples)
    assert schedule.samples_after(steps + 10) == samples + 10 * 15360


def _dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", 500) as writer:
        for doc in np.random.default_rng(0).integers(0, 500, size=(40, 50)):
            writer.add_document(doc)
    return GPTDataset(IndexedDataset(tmp_path / "d"), 8, 3)


def test_loader_follows_the_ramp_and_dp_layouts_agree(tmp_path):
    data = _dataset(tmp_path)
    runs = {}
    for dp, mbs in ((1, 4), (2, 2), (4, 1)):
        schedule = BatchSchedule(16, mbs, dp, BatchRamp(4, 4, 24))
        loaders = [StepLoader(data, mbs, schedule.num_microbatches, r, dp, schedule=schedule) for r in range(dp)]
        steps = []
        for _ in range(6):
            sizes = {loader.global_batch for loader in loaders}
            per_rank = [loader.next_step() for loader in loaders]
            assert {len(b) for b in per_rank} == {sizes.pop() // (mbs * dp)}
            steps.append(np.concatenate([x.numpy() for rank in per_rank for x, _ in rank]))
        runs[dp] = steps
        assert loaders[0].position.consumed_samples == 60
    assert [len(s) for s in runs[1]] == [4, 4, 8, 12, 16, 16]
    for dp in (2, 4):
        for a, b in zip(runs[1], runs[dp]):
            assert np.array_equal(a, b)


def test_ramp_resume_continues_mid_ramp(tmp_path):
    data = _dataset(tmp_path)
    schedule = BatchSchedule(16, 2, 1, BatchRamp(4, 4, 24))
    straight = StepLoader(data, 2, 8, 0, 1, schedule=schedule)
    expected = [straight.next_step() for _ in range(6)]
    first = StepLoader(data, 2, 8, 0, 1, schedule=schedule)
    before = [first.next_step() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = StepLoader(GPTDataset(data.indexed, data.seq_len, data.seed), 2, 8, 0, 1, schedule=schedule)
    resumed.load_state_dict(state)
    assert resumed.global_batch == 12
    after = [resumed.next_step() for _ in range(3)]
    for a, b in zip(expected, before + after):
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert (xa == xb).all() and (ya == yb).all()

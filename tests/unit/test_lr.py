"""Learning-rate schedules against hand-computed values (mtrain/train/lr.py)."""
import logging
import math
from types import SimpleNamespace

import pytest

from mtrain.config.loading import load_config
from mtrain.train.lr import LRSchedule, lr_schedule_errors


def train(**overrides):
    values = dict(lr=1.0, min_lr=0.1, lr_schedule="cosine", warmup_steps=2, decay_fraction=0.2, steps=10)
    values.update(overrides)
    return SimpleNamespace(**values)


def lrs(schedule: LRSchedule, steps) -> list[float]:
    return [schedule.lr(s) for s in steps]


def test_warmup_is_linear_from_the_first_update():
    # lr(step) serves the update after `step` completed ones: lr·(step+1)/warmup.
    schedule = LRSchedule(train(warmup_steps=4))
    assert lrs(schedule, range(4)) == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_key_steps():
    # Peak at update 2 (step 1), min_lr at update 10 (step 9); p = (update - 2) / 8.
    schedule = LRSchedule(train())
    assert schedule.lr(0) == pytest.approx(0.5)
    assert schedule.lr(1) == pytest.approx(1.0)
    assert schedule.lr(3) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # update 4: p = 1/4
    assert schedule.lr(5) == pytest.approx(0.55)  # update 6: p = 1/2
    assert schedule.lr(9) == pytest.approx(0.1)
    assert schedule.lr(25) == pytest.approx(0.1)  # past the end


def test_cosine_without_warmup_starts_at_the_peak():
    schedule = LRSchedule(train(warmup_steps=0, steps=5))
    # p = (update - 1) / 4
    assert lrs(schedule, range(5)) == pytest.approx(
        [1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1 + 0.45 * (1 - math.cos(math.pi / 4)), 0.1])


def test_wsd_stable_then_linear_decay_over_the_last_fraction():
    # 10 steps, decay_fraction 0.2: updates 9 and 10 decay, from the peak at update 8.
    schedule = LRSchedule(train(lr_schedule="wsd"))
    assert lrs(schedule, range(10)) == pytest.approx([0.5] + [1.0] * 7 + [0.55, 0.1])


def test_wsd_decay_length_rounds_halves_up():
    # 5 steps · 0.5 = 2.5 -> 3 decaying updates (3, 4, 5) from the peak at update 2.
    schedule = LRSchedule(train(lr_schedule="wsd", warmup_steps=0, steps=5, decay_fraction=0.5))
    assert lrs(schedule, range(5)) == pytest.approx([1.0, 1.0, 0.7, 0.4, 0.1])


def test_wsd_decay_that_overlaps_warmup_starts_after_it():
    # decay_fraction 0.8 would start at update 2, inside the 4-update warmup: it starts at 4.
    schedule = LRSchedule(train(lr_schedule="wsd", warmup_steps=4, decay_fraction=0.8))
    assert lrs(schedule, range(10)) == pytest.approx(
        [0.25, 0.5, 0.75, 1.0] + [1.0 - 0.9 * k / 6 for k in range(1, 7)])


def test_constant_holds_the_peak_after_warmup():
    schedule = LRSchedule(train(lr_schedule="constant"))
    assert lrs(schedule, [0, 1, 5, 9, 50]) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="cannot be negative"):
        LRSchedule(train()).lr(-1)


@pytest.mark.parametrize("overrides, field", [
    (dict(lr_schedule="linear"), "train.lr_schedule"),
    (dict(min_lr=2.0), "train.min_lr"),
    (dict(warmup_steps=-1), "train.warmup_steps"),
    (dict(decay_fraction=1.5), "train.decay_fraction"),
])
def test_invalid_fields_are_named(overrides, field):
    assert any(field in e for e in lr_schedule_errors(train(**overrides)))
    with pytest.raises(ValueError, match=field):
        LRSchedule(train(**overrides))


def test_builds_from_the_composed_config():
    cfg = load_config(["train.lr_schedule=wsd", "train.steps=20", "train.warmup_steps=2"])
    schedule = LRSchedule(cfg.train)
    assert schedule.lr(1) == pytest.approx(cfg.train.lr)
    assert schedule.lr(19) == pytest.approx(cfg.train.min_lr)


def test_state_dict_round_trip_and_changed_values_warn(caplog):
    saved = LRSchedule(train()).state_dict()
    assert LRSchedule(train()).load_state_dict(saved) == []
    with caplog.at_level(logging.WARNING, logger="mtrain.train.lr"):
        changed = LRSchedule(train(lr=2.0, steps=20)).load_state_dict(saved)
    assert changed == ["train.lr: 1.0 -> 2.0", "train.steps: 10 -> 20"]
    assert "train.lr: 1.0 -> 2.0" in caplog.text

"""The collective timeout sized to the step (train.collective_timeout_s=null):
the rule itself, hand-computed, and the config checks of its fields."""
from types import SimpleNamespace

import pytest

from mtrain.config.loading import load_config
from mtrain.config.validate import ConfigError
from mtrain.parallel.groups import (
    REPORT_MARGIN_S, TIMEOUT_FACTOR, TIMEOUT_RECENT, TIMEOUT_WARMUP, CollectiveTimeout, step_sized_timeout,
    timeout_errors,
)


def test_unknown_during_the_warmup_steps():
    assert step_sized_timeout([], 60.0) is None
    assert step_sized_timeout([30.0] * TIMEOUT_WARMUP, 60.0) is None  # compiling steps are not judged


def test_the_floor_holds_for_fast_steps():
    assert step_sized_timeout([40.0, 9.0, 9.0, 0.5, 0.7], 60.0) == 60.0


def test_ten_times_the_slowest_recent_step_rounded_up():
    # The warm-up steps (40 s) do not count; the slowest judged one (12.01 s) does.
    assert TIMEOUT_FACTOR == 10.0
    assert step_sized_timeout([40.0, 40.0, 40.0, 8.0, 12.01, 9.0], 60.0) == 121.0


def test_only_the_recent_steps_count():
    slow_then_fast = [1.0] * TIMEOUT_WARMUP + [30.0] + [2.0] * TIMEOUT_RECENT
    assert step_sized_timeout(slow_then_fast, 10.0) == 20.0  # the 30 s step has left the window
    assert step_sized_timeout(slow_then_fast[:-1], 10.0) == 300.0


def test_the_watchdog_reports_first():
    times = [1.0] * (TIMEOUT_WARMUP + 2)
    assert step_sized_timeout(times, 5.0, watchdog_s=8.0) == 8.0 + REPORT_MARGIN_S
    assert step_sized_timeout(times, 5.0, watchdog_s=None) == 10.0  # no watchdog: the rule alone


def test_the_controller_keeps_the_warmup_out_of_its_window():
    # No group is touched while the steps are unknown, nor once the timeout is fixed.
    sizing = CollectiveTimeout(None, startup_s=1800.0, floor_s=5.0)
    for t in [50.0, 50.0, 50.0]:
        sizing.step_done(t)
    assert sizing.sized_s is None and sizing.current_s == 1800.0
    assert len(sizing._times) == TIMEOUT_WARMUP
    fixed = CollectiveTimeout(300.0, startup_s=1800.0, floor_s=5.0)
    for _ in range(10):
        fixed.step_done(1.0)
    with fixed.long_operation():
        assert fixed.current_s == 300.0
    assert fixed.sized_s is None and fixed.current_s == 300.0


def test_bad_values_are_named_with_their_field():
    train = SimpleNamespace(collective_timeout_s=-1.0, collective_timeout_floor_s=0.0,
                            collective_timeout_startup_s=1800.0)
    errors = timeout_errors(train)
    assert len(errors) == 2
    assert "train.collective_timeout_s=-1.0" in errors[0] and "null" in errors[0]
    assert "train.collective_timeout_floor_s=0.0" in errors[1]
    with pytest.raises(ConfigError, match="collective_timeout_floor_s"):
        CollectiveTimeout.from_config(train)


def test_the_default_is_sized_to_the_step():
    t = load_config([]).train
    assert t.collective_timeout_s is None and timeout_errors(t) == []
    assert load_config(["train.collective_timeout_s=120"]).train.collective_timeout_s == 120.0

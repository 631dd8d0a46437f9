"""Learning-rate schedule: a pure function of the optimizer step.

``lr(step)`` is the rate of the optimizer update made after ``step`` completed
updates: ``lr(0)`` for the first update, ``lr(train.steps - 1)`` for the last.
The formulas below use the update's 1-based number ``s = step + 1``.

Every schedule starts with a linear warmup over ``warmup_steps`` updates,
``lr · s / warmup_steps`` for ``s ≤ warmup_steps`` (the first update already
takes ``lr / warmup_steps``, update ``warmup_steps`` the peak), then follows its
shape from the peak at the *anchor* update ``a = max(warmup_steps, 1)``:

- ``constant``: the peak.
- ``cosine``: ``min_lr + (lr - min_lr) · (1 + cos(π·p)) / 2`` with
  ``p = (s - a) / (steps - a)``, so the last update takes exactly ``min_lr``.
- ``wsd`` (warmup-stable-decay): the peak until the decay starts, then a
  linear ramp to ``min_lr`` at the last update. The decay takes the last
  ``D = decay_fraction · steps`` updates (rounded, halves up): ``lr - (lr - min_lr) · p`` with
  ``p = (s - d) / (steps - d)`` and ``d = max(steps - D, a)`` (a decay that
  would overlap the warmup starts where the warmup ends).

``p`` is clamped to [0, 1]: updates past ``train.steps`` keep ``min_lr``.
"""
from __future__ import annotations

import logging
import math

LR_SCHEDULES = ("cosine", "wsd", "constant")
_STATE_FIELDS = ("lr", "min_lr", "lr_schedule", "warmup_steps", "decay_fraction", "steps")

log = logging.getLogger(__name__)


def lr_schedule_errors(train) -> list[str]:
    """Problems with the ``train`` fields the schedule reads, each naming the field."""
    errors = []
    if train.lr_schedule not in LR_SCHEDULES:
        errors.append(f"train.lr_schedule={train.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if train.lr <= 0 or train.min_lr < 0:
        errors.append(f"train.lr={train.lr} must be positive and train.min_lr={train.min_lr} non-negative")
    elif train.min_lr > train.lr:
        errors.append(f"train.min_lr={train.min_lr} exceeds train.lr={train.lr}: the schedule decays from lr to min_lr")
    if train.warmup_steps < 0:
        errors.append(f"train.warmup_steps={train.warmup_steps} must be non-negative")
    if not 0.0 <= train.decay_fraction <= 1.0:
        errors.append(f"train.decay_fraction={train.decay_fraction} must lie in [0, 1]")
    return errors


class LRSchedule:
    """``lr(step)`` for ``train.lr_schedule`` (see the module doc for the formulas)."""

    def __init__(self, train):
        errors = lr_schedule_errors(train)
        if errors:
            raise ValueError("invalid learning-rate schedule: " + "; ".join(errors))
        self.peak = float(train.lr)
        self.min_lr = float(train.min_lr)
        self.kind = str(train.lr_schedule)
        self.warmup_steps = int(train.warmup_steps)
        self.decay_fraction = float(train.decay_fraction)
        self.steps = int(train.steps)
        self.anchor = max(self.warmup_steps, 1)  # the update that takes the peak lr

    def lr(self, step: int) -> float:
        """The rate of the update made after ``step`` completed updates."""
        if step < 0:
            raise ValueError(f"step counts completed optimizer updates and cannot be negative; got {step}")
        update = step + 1  # 1-based number of this update
        if update <= self.warmup_steps:
            return self.peak * update / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        if self.kind == "cosine":
            p = self._progress(update, self.anchor)
            return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        decay_steps = math.floor(self.decay_fraction * self.steps + 0.5)  # nearest, halves up
        decay_start = max(self.steps - decay_steps, self.anchor)
        return self.peak - (self.peak - self.min_lr) * self._progress(update, decay_start)

    def _progress(self, update: int, start: int) -> float:
        """Fraction of the way from update ``start`` (0) to the last update (1)."""
        return min(max((update - start) / max(self.steps - start, 1), 0.0), 1.0)

    def state_dict(self) -> dict:
        """The config values the schedule was built from (it keeps no other state)."""
        return {"lr": self.peak, "min_lr": self.min_lr, "lr_schedule": self.kind,
                "warmup_steps": self.warmup_steps, "decay_fraction": self.decay_fraction,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> list[str]:
        """Compare a checkpoint's schedule with this one. The current config wins;
        each changed field is logged as a warning and returned."""
        current = self.state_dict()
        changed = [f"train.{k}: {state[k]!r} -> {current[k]!r}"
                   for k in _STATE_FIELDS if k in state and state[k] != current[k]]
        if changed:
            log.warning("resuming with a changed learning-rate schedule (%s); the lr jumps "
                        "to the new schedule's value at the resumed step", ", ".join(changed))
        return changed

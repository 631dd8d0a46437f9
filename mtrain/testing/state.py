"""A per-rank checkpoint component for tests: a plain dict behind the
``Stateful`` protocol (``state_dict()`` / ``load_state_dict(state)``)."""
from __future__ import annotations


class DictState:
    def __init__(self, state: dict | None = None):
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = state

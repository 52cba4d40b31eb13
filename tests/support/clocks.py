"""A clock the test moves by hand: no real sleep in the fast tier."""

from __future__ import annotations


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

"""Time, injected: the system clock for real use, a fake one that tests move by hand.

Deadlines are kept in CLOCK_MONOTONIC seconds, which keep counting across daemon
restarts within one boot; the wall clock is only for what people read and for
carrying a timer across a reboot.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only when told: a 3-hour timeout becomes a one-line test."""

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self._monotonic = monotonic
        self._wall = wall

    def monotonic(self) -> float:
        return self._monotonic

    def wall(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go back")
        self._monotonic += seconds
        self._wall += seconds

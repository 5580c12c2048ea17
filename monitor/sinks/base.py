"""What every sink of the event log shares: the feed of the log after the sink's cursor,
backoff with jitter, a store worker thread, and progress written soon, in batches.

    engine commit -> Feed.offer (live, the next event at once) --+--> the sink's queue -> send
    store (after a gap, at start, when the queue was full) -------+

A sink's cursor says: every event at or below it is delivered (or recorded as pending or
failed, for sinks that keep per-event rows) or not of a type the sink wants. Live events
reach the queue straight from the engine; anything the live feed did not carry (a start,
a gap, a full queue) is read back from the store, which is the truth. A kill -9 between a
send and its record means one more send with the same id, never none.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from monitor.store import Record
from monitor.tasks import cancel

T = TypeVar("T")

MAX_READY = 10_000  # events queued in memory per sink; beyond, they wait in the store
READ_BATCH = 1000  # events read back from the store at once


@dataclass(frozen=True, slots=True)
class Backoff:
    """`first_s`, then each delay `factor` times the last, up to `max_s`, each +-`jitter`
    at random so that many senders retrying at once spread out."""

    first_s: float
    max_s: float
    factor: float = 4.0
    jitter: float = 0.2

    def delay(self, attempts: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after `attempts` (>= 1) failed ones in a row."""
        delay = min(self.first_s * self.factor ** max(0, attempts - 1), self.max_s)
        return delay * (1 + self.jitter * (2 * rng() - 1))


class StoreThread:
    """One worker thread for a sink's SQLite connection (which is not thread-safe); the loop
    never blocks on the store."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"monitor-{name}")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Feed:
    """The event log after a sink's cursor, in order, handed to `admit` one event at a time.

    `seen`: every event up to here was admitted or is not wanted (None: not loaded yet).
    `read(since)` returns the sink's events after `since` from the store (at most
    READ_BATCH, filtered as the sink wants); `room()` says whether the sink's queue takes more.
    """

    def __init__(self, wants: Callable[[Record], bool], admit: Callable[[Record], None],
                 read: Callable[[int], Awaitable[list[Record]]], last_seq: Callable[[], Awaitable[int]],
                 room: Callable[[], bool]) -> None:
        self.wants = wants
        self.admit = admit
        self.read = read
        self.last_seq = last_seq
        self.room = room
        self.seen: int | None = None
        self.newest = 0  # the newest event id offered or read: what the log holds, as far as we know
        self.catch_up = True  # the store must be read: at start, and after a gap in the live feed
        self.loading = False
        self.wake = asyncio.Event()

    def offer(self, record: Record) -> None:
        """A committed event, live. The next one in the log is admitted at once; after a gap
        the store is read (`read_back`, from the sink's task), which is the truth."""
        assert record.seq is not None
        self.newest = max(self.newest, record.seq)
        if self.seen is not None and record.seq == self.seen + 1 and not self.catch_up and not self.loading and self.room():
            self.seen = record.seq
            if self.wants(record):
                self.admit(record)
                self.wake.set()
        elif self.seen is None or record.seq > self.seen:
            self.catch_up = True
            self.wake.set()

    async def read_back(self) -> None:
        """Admit what the store holds after `seen`. The live feed waits meanwhile; what it
        brings during the read asks for one more read."""
        self.loading = True
        try:
            while self.catch_up:
                self.catch_up = False
                assert self.seen is not None
                last = await self.last_seq()
                self.newest = max(self.newest, last)
                while self.seen < last:
                    rows = await self.read(self.seen)
                    for record in rows:
                        assert record.seq is not None
                        if record.seq <= last:
                            self.admit(record)
                    if len(rows) < READ_BATCH or (rows[-1].seq or last) >= last:
                        break
                    self.seen = rows[-1].seq or last
                    if not self.room():  # the rest once these are sent
                        self.catch_up = True
                        return
                self.seen = max(self.seen, last)
        finally:
            self.loading = False


class Saver:
    """Progress written soon and in batches, off the event loop: `kick()` after each change;
    one task calls `write()` until a call finds nothing new to write, at most once every
    `interval_s` (a burst then costs a few writes, not one per event)."""

    def __init__(self, write: Callable[[], Awaitable[bool]], interval_s: float = 0.0) -> None:
        self.write = write  # writes what changed; False when there was nothing
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while await self.write():
                if self.interval_s:
                    await asyncio.sleep(self.interval_s)
        finally:
            self._task = None

    async def flush(self) -> None:
        """Write what is left now (the last word at a clean stop)."""
        await cancel(self._task)
        await self.write()

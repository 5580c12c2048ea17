"""What every source shares: the async-iterator plumbing, watch bookkeeping and resync.

A source turns one kernel mechanism into `Event`s. It is started on a running
asyncio loop, iterated with `async for`, and told which processes matter with
`watch(key)` / `unwatch(key)`. Once a key is watched the source owes exactly one
`Exited` for it (unless it is unwatched first), from whatever evidence comes first;
a key that is already dead when watched yields its `Exited` at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from monitor.errors import NoSuchProcess, SourceFailed
from monitor.events import RELIST, Event, Exited, Forked, Overrun
from monitor.identity import ProcessKey, zombie_exit_status

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Watch:
    """One watched process, with what its source holds for it."""

    key: ProcessKey
    descendants: bool = False
    fd: int | None = None  # a pidfd, for the sources that hold one
    is_child: bool = False  # our own child: waitid() can tell its status
    extra: dict[str, Any] = field(default_factory=dict)


class EventSource:
    """Base of every source. Subclasses implement `_start`, `_close` and the hooks."""

    name: ClassVar[str] = "source"
    #: whether this source can stream events of every process on the host
    supports_all_events: ClassVar[bool] = False
    #: the evidence named on an `Exited` that a check (not an event) found
    found_dead_evidence: ClassVar[str] = RELIST

    def __init__(self, *, all_events: bool = False) -> None:
        self.all_events = all_events
        self._watches: dict[int, Watch] = {}  # by PID: one live process per PID
        self._pending: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False
        self._failure: BaseException | None = None
        self._listener: Callable[[Event], None] | None = None
        self.counters: dict[str, int] = {"events": 0, "exits": 0, "overruns": 0, "resyncs": 0}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the mechanism and confirm that it works; SourceUnavailable if it cannot."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        await self._start()
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches.values()):
            self._release(watch)
        self._watches.clear()
        await self._close()
        self._wake()

    async def __aenter__(self) -> EventSource:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        pass

    # -- the stream ------------------------------------------------------------------

    def __aiter__(self) -> EventSource:
        return self

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._failure is not None:
                raise SourceFailed(f"{self.name}: {self._failure}") from self._failure
            if self._closed:
                raise StopAsyncIteration
            assert self._loop is not None, "start() the source before iterating it"
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pending.popleft()

    def set_listener(self, listener: Callable[[Event], None] | None) -> None:
        """Hand every event to `listener` the moment it is decoded, instead of queuing it
        for `async for`: the shortest path from the kernel to a consumer (no task switch).

        It runs in the event loop's thread, inside the source's own callback (and inside
        `watch()` for a key found dead there), so it must be quick and must not block.
        Events already queued stay queued for `async for`; None goes back to queuing.
        """
        self._listener = listener

    def _emit(self, event: Event) -> None:
        self.counters["events"] += 1
        if self._listener is not None:
            self._listener(event)
            return
        self._pending.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, err: BaseException) -> None:
        log.error("%s source failed: %s", self.name, err)
        self._failure = err
        self._wake()

    # -- watching --------------------------------------------------------------------

    def expect(self, pids: Iterable[int]) -> None:
        """These PIDs are about to be watched: keep what the kernel says of their exits from
        now on, so one that ends before its watch starts still gets its real status. Call it
        before their keys are taken (`wait_for_exits` does). A source that holds no queue of
        kernel events has nothing to keep."""

    def watch(self, key: ProcessKey, *, descendants: bool = False) -> None:
        """Report this process's exit (and, with `descendants`, its new descendants)."""
        if self._closed:
            raise SourceFailed(f"{self.name}: the source is closed")
        old = self._watches.get(key.pid)
        if old is not None:
            if old.key == key:
                old.descendants = old.descendants or descendants
                return
            # Another process held this PID before: the PID was reused, so the old
            # one is dead, whatever its watch said.
            self._finish(old, self._exit_status(old), self.found_dead_evidence)
        watch = Watch(key, descendants)
        self._watches[key.pid] = watch  # before _attach: a kernel-side filter is built from it
        try:
            self._attach(watch)
        except NoSuchProcess:
            # Gone between making the key and watching it: that is an exit, verified.
            del self._watches[key.pid]
            found = self._found_dead(watch)
            self._release(watch)
            self._emit_exit(watch, *found)
            return
        if not self._alive(watch):
            found = self._found_dead(watch)
            if self._watches.get(key.pid) is watch:  # not already finished by an event read meanwhile
                self._finish(watch, *found)

    def unwatch(self, key: ProcessKey) -> None:
        watch = self._watches.get(key.pid)
        if watch is not None and watch.key == key:
            del self._watches[key.pid]
            self._release(watch)

    def watched(self) -> list[ProcessKey]:
        return [w.key for w in self._watches.values()]

    def stats(self) -> dict[str, Any]:
        return {"source": self.name, "watched": len(self._watches), **self.counters}

    # -- hooks for subclasses ----------------------------------------------------------

    def _attach(self, watch: Watch) -> None:
        """Take hold of the process (a pidfd, a registration); NoSuchProcess if gone."""

    def _release(self, watch: Watch) -> None:
        """Let go of what `_attach` took."""

    def _alive(self, watch: Watch) -> bool:
        """The identity check: is this very process's thread group still alive?"""
        return watch.key.is_alive()

    def _exit_status(self, watch: Watch) -> int | None:
        """The raw wait status of a process found dead, when it can be known."""
        return zombie_exit_status(watch.key)

    def _found_dead(self, watch: Watch) -> tuple[int | None, str, int | None]:
        """(status, evidence, kernel time) of a process found dead as its watch starts."""
        return self._exit_status(watch), self.found_dead_evidence, None

    # -- shared transitions ------------------------------------------------------------

    def _finish(self, watch: Watch, status: int | None, source: str, kernel_ts_ns: int | None = None) -> None:
        """The watched process is gone: emit its one `Exited` and stop watching it."""
        if self._watches.get(watch.key.pid) is watch:
            del self._watches[watch.key.pid]
        self._emit_exit(watch, status, source, kernel_ts_ns)  # the consumer first: releasing can wait
        self._release(watch)

    def _emit_exit(self, watch: Watch, status: int | None, source: str, kernel_ts_ns: int | None = None) -> None:
        self.counters["exits"] += 1
        self._emit(Exited.from_wait_status(watch.key, status, source, kernel_ts_ns, time.monotonic_ns()))

    def _track_child(self, parent: Watch, child: ProcessKey, kernel_ts_ns: int | None, source: str) -> None:
        """A descendant of a tree-watched process appeared: report it and watch it too."""
        self._emit(Forked(parent.key, child, source, kernel_ts_ns))
        self.watch(child, descendants=True)

    def resync(self) -> int:
        """Verify every watched key; each that died yields its `Exited`. Returns how many."""
        self.counters["resyncs"] += 1
        dead = [w for w in list(self._watches.values()) if not self._alive(w)]
        for watch in dead:
            self._finish(watch, self._exit_status(watch), self.found_dead_evidence)
        return len(dead)

    def _overrun(self, lost: int | None = None) -> None:
        self.counters["overruns"] += 1
        log.warning("%s lost events (%s); verifying %d watched processes", self.name, lost or "count unknown", len(self._watches))
        self._emit(Overrun(self.name, lost))
        self.resync()

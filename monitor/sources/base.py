"""What every source shares: the async-iterator plumbing, watch bookkeeping and resync.

A source turns one kernel mechanism into `Event`s. It is started on a running
asyncio loop, iterated with `async for`, and told which processes matter with
`watch(key)` / `unwatch(key)`. Once a key is watched the source owes exactly one
`Exited` for it (unless it is unwatched first), from whatever evidence comes first;
a key that is already dead when watched yields its `Exited` at once.

A tree watch (`descendants=True`) reports each new descendant as `Forked` and
follows it as a tree too, even one already dead when its fork is learnt: its
`Forked` comes first, then (netlink: once its own records are read, so its own
forks come before it) its `Exited`. With `existing=True` the descendants alive at
the watch are taken too (`/proc/PID/task/*/children`, recursively).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from monitor.errors import MonitorError, NoSuchProcess, SourceFailed
from monitor.events import RELIST, Event, Exited, Forked, Overrun
from monitor.identity import ProcessKey, children_of, zombie_exit_status

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

    def watch(self, key: ProcessKey, *, descendants: bool = False, existing: bool = False) -> None:
        """Report this process's exit (and, with `descendants`, its new descendants; with
        `existing` too, the descendants it has now, as `Forked` events)."""
        if self._closed:
            raise SourceFailed(f"{self.name}: the source is closed")
        old = self._watches.get(key.pid)
        if old is not None and old.key == key:
            old.descendants = old.descendants or descendants
        else:
            self._watch_new(key, descendants)
        watch = self._watches.get(key.pid)
        if existing and descendants and watch is not None and watch.key == key:
            self._take_existing(watch)

    def _watch_new(self, key: ProcessKey, descendants: bool) -> None:
        old = self._watches.get(key.pid)
        if old is not None:
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

    def _track_child(self, parent: Watch, child: ProcessKey, kernel_ts_ns: int | None, source: str) -> Watch | None:
        """A descendant of a tree-watched process appeared: watch it (as a tree), report
        it, and if it is already dead, its exit right after. Returns its watch while it lives.

        Watched before it is reported, so a consumer that watches it on `Forked` finds
        it watched; reported before its death, so `Forked` always precedes `Exited`.
        """
        watch = self._adopt(child)
        self._emit(Forked(parent.key, child, source, kernel_ts_ns))
        if self._watches.get(child.pid) is not watch:
            return None  # unwatched (or finished) by the consumer meanwhile
        if watch.extra.get("gone") or not self._alive(watch):
            self._finish(watch, *self._found_dead(watch))
            return None
        return watch

    def _adopt(self, child: ProcessKey) -> Watch:
        """Watch a new descendant as a tree, without judging whether it lives. One gone
        before it could be taken hold of stays watched, marked `gone`, until its death
        is reported (by the caller; netlink: by its own exit record)."""
        old = self._watches.get(child.pid)
        if old is not None and old.key == child:
            old.descendants = True
            return old
        if old is not None:
            self._finish(old, self._exit_status(old), self.found_dead_evidence)
        watch = Watch(child, True)
        self._watches[child.pid] = watch
        try:
            self._attach(watch)
        except NoSuchProcess:
            watch.extra["gone"] = True
        except (MonitorError, OSError) as err:
            # Not followable (AccessDenied, EMFILE): left unwatched, so that the consumer's own
            # watch() on its Forked meets the same refusal and can call it unobservable.
            log.debug("%s cannot follow %s: %s", self.name, child, err)
            del self._watches[child.pid]
        return watch

    def _take_existing(self, root: Watch) -> None:
        """Every descendant the tree has now, as `Forked` of its parent, each then watched.

        Each is watched before its own children are listed, so a child it forks in
        between is seen either here or by the source's own fork tracking.
        """
        stack = [root]
        while stack:
            parent = stack.pop()
            for pid in self._children_of(parent.key.pid):
                if pid == parent.key.pid:
                    continue
                old = self._watches.get(pid)
                try:
                    key = old.key if old is not None else ProcessKey.of(pid)
                except MonitorError:
                    continue  # gone already
                if old is not None and old.descendants:
                    continue  # followed already (a fork event was quicker)
                watch = self._track_child(parent, key, None, self.name)
                if watch is not None:
                    stack.append(watch)

    def _children_of(self, pid: int) -> list[int]:
        return children_of(pid)

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

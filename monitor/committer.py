"""Committing: the one writer that makes what the engine decided durable, then acted on.

The invariant it keeps: **the engine's memory is what a restart would load from the
store, plus what is queued here.** Three rules make it hold by construction:

- Rows are named, not copied. A state machine reports every row it changed (sessions
  by id, locks and fuses by directory); the names wait in `pending`, and the rows are
  serialized from memory when the transaction is made. A change cannot be missed by
  persistence, and an older copy of a row can never overwrite a newer one.
- Work driven by the kernel (an exit, a fork, a timeout) happened whatever the disk
  says: when its commit fails it stays queued, in order, and is retried with backoff
  until stored. Memory already holds it, so reads keep being served.
- Work asked for by a client (lock, launch, stop, fuse) is undone in memory when its
  commit fails, and the client is told why (`StorageError`: "disk full", "I/O error").
  Nothing phantom stays.

Side effects (signals, hooks, listeners) run only after their commit, in order, and an
exception from one of them is logged, never allowed to stop this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from monitor.errors import StorageError
from monitor.store import Batch, Record
from monitor.tracker import ChildRow, Step

log = logging.getLogger(__name__)

GROUP_LIMIT = 1000  # work items in one transaction
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0  # a client asking while the disk is full waits at most this for its answer


@dataclass
class Rows:
    """Names of the rows that differ from the store's: what the next transaction writes."""

    sessions: set[str] = field(default_factory=set)
    locks: set[str] = field(default_factory=set)
    fuses: set[str] = field(default_factory=set)
    children: set[ChildRow] = field(default_factory=set)  # a session's child, by (session id, key)
    child_counts: set[str] = field(default_factory=set)  # sessions whose counts of ended children changed

    def __bool__(self) -> bool:
        return bool(self.sessions or self.locks or self.fuses or self.children or self.child_counts)

    def merge(self, other: Rows) -> None:
        self.sessions |= other.sessions
        self.locks |= other.locks
        self.fuses |= other.fuses
        self.children |= other.children
        self.child_counts |= other.child_counts


@dataclass(eq=False)
class Work:
    """One step to store and then act on. `undo` is set for a client's request: how to take
    it back in memory if its commit fails (kernel-driven work has none: it is retried)."""

    step: Step
    records: list[Record]
    done: asyncio.Future[None] | None = None
    undo: Callable[[], None] | None = None


class Committer:
    """The commit loop: group commit of whatever queued up while the last one was written."""

    def __init__(self, write: Callable[[Batch], Awaitable[None]], serialize: Callable[[Rows], Batch],
                 act: Callable[[Work], None]) -> None:
        self._write = write
        self._serialize = serialize
        self._act = act
        self.pending = Rows()
        self.failure: StorageError | None = None  # the store's last error, while it lasts
        self.failures = 0  # commits that failed, ever
        self._queue: asyncio.Queue[Work | None] = asyncio.Queue()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, work: Work) -> None:
        self._queue.put_nowait(work)

    def close(self) -> None:
        """End the loop after everything queued so far (a stop of the daemon writes what it decided)."""
        self._queue.put_nowait(None)

    async def run(self) -> None:
        retry: list[Work] = []
        delay = RETRY_FIRST_S
        closing = False
        while True:
            items: list[Work | None] = list(retry)
            retry = []
            if not closing:
                if not items:
                    items.append(await self._queue.get())
                else:  # failing: try again after `delay`, or sooner when new work arrives
                    with contextlib.suppress(TimeoutError):
                        items.append(await asyncio.wait_for(self._queue.get(), delay))
            while not self._queue.empty() and len(items) < GROUP_LIMIT:
                items.append(self._queue.get_nowait())
            closing = closing or any(item is None for item in items)
            work = [item for item in items if item is not None]
            rows, self.pending = self.pending, Rows()
            try:
                batch = self._serialize(rows)
                for item in work:
                    batch.outbox += item.records
                if batch:
                    await self._write(batch)
            except Exception as err:
                self.pending.merge(rows)
                retry = self._failed(work, err if isinstance(err, StorageError) else StorageError.of(err))
                delay = min(delay * 2, RETRY_MAX_S) if retry else RETRY_FIRST_S
                if closing:
                    if retry or self.pending:
                        log.error("stopping with %d changes not stored: %s", len(retry) + len(self.pending.sessions), self.failure)
                    return
                continue
            if self.failure is not None:
                log.warning("the state store works again")
                self.failure = None
            delay = RETRY_FIRST_S
            for item in work:
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)
                try:
                    self._act(item)
                except Exception:
                    log.exception("acting on a committed step failed; going on")
            if closing and self._queue.empty():
                return

    def _failed(self, work: list[Work], err: StorageError) -> list[Work]:
        """A commit failed: undo the clients' work (newest first) and tell them; keep the kernel's."""
        self.failures += 1
        if self.failure is None or self.failure.kind != err.kind:
            log.error("could not store state: %s; kernel events are kept and retried, requests are refused", err)
        self.failure = err
        for item in reversed(work):
            if item.undo is None:
                continue
            try:
                item.undo()
            except Exception:
                log.exception("undoing a request that was not stored failed")
            if item.done is not None and not item.done.done():
                item.done.set_exception(err)
        return [item for item in work if item.undo is None]

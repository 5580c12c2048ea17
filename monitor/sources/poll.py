"""psutil polling: the macOS mode and the last fallback.

Checks every watched key at an interval, off the event loop. It notices death
and PID reuse (a different start time) but, like `kill(pid, 0)`, only one
interval late at worst; the exit status is known only while the process is a
zombie whose /proc entry we may read, else None.
"""

from __future__ import annotations

import asyncio

from monitor.errors import SourceUnavailable
from monitor.events import POLL
from monitor.identity import zombie_exit_status
from monitor.sources.base import EventSource, Watch
from monitor.sources.children import ChildScanner, children_by_parent
from monitor.tasks import cancel

DEFAULT_INTERVAL_S = 1.0


def _dead_among(watches: list[Watch]) -> list[tuple[Watch, int | None]]:
    """Runs in a worker thread: which of these are gone, and with what status."""
    return [(w, zombie_exit_status(w.key)) for w in watches if not w.key.is_alive()]


class PollSource(EventSource):
    """Exit (and, for tree watches, fork) events found by checking at an interval."""

    name = POLL

    def __init__(self, *, interval_s: float = DEFAULT_INTERVAL_S, all_events: bool = False) -> None:
        if all_events:
            raise SourceUnavailable("poll", "checks only watched processes; streaming every process needs netlink")
        if interval_s <= 0:
            raise ValueError(f"poll interval must be positive, got {interval_s}")
        super().__init__()
        self.interval_s = interval_s
        self._children = ChildScanner(self, interval_s)
        self._task: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        import psutil  # noqa: F401  (fail here, clearly, where psutil is missing)

        assert self._loop is not None
        self._task = self._loop.create_task(self._run(), name="poll-source")

    async def _close(self) -> None:
        await cancel(self._task)

    async def _run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                await self.check_once()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a broken poller must say so, not go quiet
            self._fail(err)

    async def check_once(self) -> None:
        """One round: every watched key verified, descendants of tree watches found."""
        watches = list(self._watches.values())
        if not watches:
            return
        for watch, status in await asyncio.to_thread(_dead_among, watches):
            if self._watches.get(watch.key.pid) is watch:  # not unwatched meanwhile
                self._finish(watch, status, POLL)
        if any(w.descendants for w in self._watches.values()):
            self._children.scan_once(await asyncio.to_thread(children_by_parent))

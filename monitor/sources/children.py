"""Descendant discovery by scanning, for the sources that hear no fork events.

netlink hears every fork; pidfd and poll do not, so for processes watched with
`descendants=True` they scan the process table at an interval and report the
children they find. A child that lives shorter than the interval is missed:
that is the price of these sources, and `doctor` says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import psutil

from monitor.errors import MonitorError
from monitor.identity import ProcessKey
from monitor.tasks import cancel

if TYPE_CHECKING:
    from monitor.sources.base import EventSource

log = logging.getLogger(__name__)


def children_by_parent() -> dict[int, list[int]]:
    """PPID -> child PIDs for the whole host, from one pass over the process table."""
    table: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info["ppid"]
        if ppid is not None:
            table.setdefault(ppid, []).append(proc.pid)
    return table


class ChildScanner:
    """Runs `children_by_parent()` off the loop while some watch wants descendants."""

    def __init__(self, source: EventSource, interval_s: float) -> None:
        self._source = source
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._source.name}-children")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        pause = self._interval_s
        while True:
            await asyncio.sleep(pause)
            started = time.monotonic()
            table = await asyncio.to_thread(children_by_parent)
            # A scan of a host with 10,000 processes takes ~0.3 s of CPU: keep scanning to
            # at most ~5% of a core by waiting at least 20 times as long as a scan took.
            pause = max(self._interval_s, 20 * (time.monotonic() - started))
            if not self.scan_once(table):
                return

    def scan_once(self, table: dict[int, list[int]]) -> bool:
        """Report new children of tree-watched processes; False when none is left to follow."""
        source = self._source
        parents = [w for w in source._watches.values() if w.descendants]
        known = set(source._watches)
        for parent in parents:
            for pid in table.get(parent.key.pid, ()):
                if pid in known:
                    continue
                try:
                    child = ProcessKey.of(pid)
                except MonitorError:
                    continue  # gone already: too short-lived for a scanning source
                if source._watches.get(parent.key.pid) is parent:
                    source._track_child(parent, child, None, source.name)
                    known.add(pid)
        return bool(parents)

"""A scripted source, for tests and for people writing clients without a kernel.

It touches no process: a key is alive until the script says it exited or
vanished. It keeps the same contract as the real sources (one `Exited` per
watched key, `Overrun` followed by a resync), so logic tested on it holds on them.

    source = FakeSource()
    await source.start()
    source.watch(key)
    source.exit(key, exit_code=3)      # -> Exited(key, exit_code=3, source="fake")
    source.vanish(other)               # dies silently, as if the kernel lost the event
    source.overrun()                   # -> Overrun, then Exited(other, source="relist")
"""

from __future__ import annotations

import itertools

from monitor.errors import AccessDenied
from monitor.events import FAKE, Execed, Forked
from monitor.identity import ProcessKey
from monitor.sources.base import EventSource, Watch


class FakeSource(EventSource):
    name = FAKE
    supports_all_events = True

    def __init__(self, *, all_events: bool = False) -> None:
        super().__init__(all_events=all_events)
        self._dead: dict[ProcessKey, int | None] = {}
        self.refuse: set[ProcessKey] = set()  # keys it cannot watch (AccessDenied), as a real source may
        self._clock_ns = itertools.count(1_000_000_000, 1_000)

    async def _start(self) -> None:
        pass

    def _attach(self, watch: Watch) -> None:
        if watch.key in self.refuse:
            raise AccessDenied(f"fake: refusing to watch {watch.key}")

    def restarted(self) -> FakeSource:
        """A fresh, unstarted source that knows the same deaths: for a restart in a test."""
        fresh = FakeSource(all_events=self.all_events)
        fresh._dead = dict(self._dead)
        fresh.refuse = set(self.refuse)
        return fresh

    def is_alive(self, key: ProcessKey) -> bool:
        """The scripted truth: alive until the script said it exited or vanished."""
        return key not in self._dead

    def _alive(self, watch: Watch) -> bool:
        return watch.key not in self._dead

    def _children_of(self, pid: int) -> list[int]:
        return []  # its processes exist only in the script

    def _exit_status(self, watch: Watch) -> int | None:
        return self._dead.get(watch.key)

    # -- the script ---------------------------------------------------------------------

    def fork(self, parent: ProcessKey, child: ProcessKey) -> None:
        """`parent` forked `child`: reported for tree watches (which then follow it) or in all mode."""
        watch = self._watches.get(parent.pid)
        if watch is not None and watch.key == parent and watch.descendants:
            self._track_child(watch, child, next(self._clock_ns), FAKE)
        elif self.all_events:
            self._emit(Forked(parent, child, FAKE, next(self._clock_ns)))

    def exec(self, key: ProcessKey) -> None:
        watch = self._watches.get(key.pid)
        if (watch is not None and watch.key == key) or self.all_events:
            self._emit(Execed(key, FAKE, next(self._clock_ns)))

    def exit(self, key: ProcessKey, *, exit_code: int | None = None, signal: int | None = None, core_dumped: bool = False) -> None:
        """`key` ended. With neither exit_code nor signal, the status is unknown."""
        if exit_code is not None and signal is not None:
            raise ValueError("a process ends with an exit code or a signal, not both")
        status: int | None = None
        if exit_code is not None:
            status = (exit_code & 0xFF) << 8
        elif signal is not None:
            status = signal | (0x80 if core_dumped else 0)
        self._dead[key] = status
        watch = self._watches.get(key.pid)
        if watch is not None and watch.key == key:
            self._finish(watch, status, FAKE, next(self._clock_ns))
        elif self.all_events:
            self._emit_exit(Watch(key), status, FAKE, next(self._clock_ns))

    def vanish(self, key: ProcessKey) -> None:
        """`key` died and its event was lost: only a resync will tell."""
        self._dead[key] = None

    def overrun(self, lost: int | None = None) -> None:
        """Events were lost: `Overrun`, then every watched key is verified."""
        self._overrun(lost)

"""The baselines a listener can run in place of a monitor source (bench/listener.py), with
the same interface: kill(pid, 0) polling, and the least an asyncio loop or a blocking thread
can do with a proc-connector socket."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from monitor.tasks import cancel


class QueueSource:
    """What the two baselines share with a monitor source: watch(), stats() and an
    `async for` fed through a queue (None ends it)."""

    name = "baseline"

    def __init__(self) -> None:
        self._watched: dict[int, Any] = {}
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError

    def watch(self, key: Any) -> None:
        self._watched[key.pid] = key

    def stats(self) -> dict[str, Any]:
        return {"source": self.name, "watched": len(self._watched)}

    def __aiter__(self) -> QueueSource:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item


class KillPoller(QueueSource):
    """Baseline: `kill(pid, 0)` every `interval_s`, as `tail --pid` does.

    A zombie still answers kill(pid, 0), so this sees an exit only once the parent
    reaped; the latency harness reaps at once. Same interface as a monitor source.
    """

    name = "kill0"

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KillPoller:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def close(self) -> None:
        if self._task is not None:
            await cancel(self._task)
            self._task = None
            self._queue.put_nowait(None)



    async def _run(self) -> None:
        from monitor.events import Exited

        deadline = time.monotonic()
        while True:
            deadline += self.interval_s  # a fixed grid: the harness picks the exit's phase
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            for pid, key in list(self._watched.items()):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    del self._watched[pid]
                    self._queue.put_nowait(Exited.from_wait_status(key, None, self.name, None, time.monotonic_ns()))


class MinimalAsyncioNetlink(QueueSource):
    """Diagnostic baseline: about the least an asyncio proc-connector reader can do.

    A non-blocking socket with the exit-only mask on `loop.add_reader`, decoded
    with one struct call, each watched exit handed to the `async for` consumer
    through an asyncio.Queue as an `Exited`, or to a listener inside the read
    callback (the `_cb` method): none of monitor's source code. Its gap to the C
    listener is what Python + asyncio cost; netlink's gap to it is what monitor's
    own event path costs.
    """

    name = "minimal"

    def __init__(self) -> None:
        super().__init__()
        self._sock: socket.socket | None = None
        self._listener: Callable[[Any], None] | None = None

    def set_listener(self, listener: Callable[[Any], None] | None) -> None:
        self._listener = listener

    @staticmethod
    def _subscribe() -> socket.socket:
        """A proc-connector socket subscribed to exits only (the kernel handles the request
        inside send(): subscribed once it returns)."""
        from monitor.sources import cnproc

        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, cnproc.NETLINK_CONNECTOR)
        sock.bind((0, cnproc.CN_IDX_PROC))
        sock.send(cnproc.subscribe_message(cnproc.PROC_CN_MCAST_LISTEN, cnproc.PROC_EVENT_EXIT))
        return sock

    async def __aenter__(self) -> MinimalAsyncioNetlink:
        sock = self._subscribe()
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self._sock = sock
        return self

    async def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._queue.put_nowait(None)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(8192)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: a lost target shows up as "missed" in the harness
                continue
            exited = self._exited(data)
            if exited is None:
                continue
            if self._listener is not None:
                self._listener(exited)
            else:
                self._queue.put_nowait(exited)

    def _exited(self, data: bytes) -> Any:
        """The `Exited` of a watched process in one proc-connector message, else None."""
        from monitor.events import Exited
        from monitor.sources.cnproc import MESSAGE_SIZE, PROC_EVENT_EXIT, RECORD

        if len(data) != MESSAGE_SIZE:
            return None
        _seq, what, _cpu, ts, pid, tgid, status, *_ = RECORD.unpack(data)
        if what != PROC_EVENT_EXIT or pid != tgid or tgid not in self._watched:
            return None
        return Exited.from_wait_status(self._watched.pop(tgid), status, self.name, ts, time.monotonic_ns())


class MinimalThreadNetlink(MinimalAsyncioNetlink):
    """Diagnostic: the minimal reader, but a thread blocked in recv() (GIL released) reads the
    socket and calls the listener there, as the C listener does; `async for` is not offered."""

    name = "minimal_thread"

    async def __aenter__(self) -> MinimalThreadNetlink:
        self._sock = self._subscribe()
        threading.Thread(target=self._run, daemon=True).start()
        return self

    async def close(self) -> None:
        self._queue.put_nowait(None)

    def _run(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(8192)
            except OSError:
                continue
            exited = self._exited(data)
            if exited is not None and self._listener is not None:
                self._listener(exited)


def make_source(method: str) -> Any:
    """The source under test, by the method names used in the results."""
    from monitor.sources.netlink import NetlinkSource
    from monitor.sources.pidfd import PidfdSource
    from monitor.sources.poll import PollSource

    factories: dict[str, Callable[[], Any]] = {
        "netlink_python": lambda: NetlinkSource(types=("exit",), decoder="python"),
        "netlink_native": lambda: NetlinkSource(types=("exit",), decoder="native"),
        # Without the kernel's tgid filter: as with tree watches or more than 256 watches.
        "nofilter_python": lambda: NetlinkSource(types=("exit",), decoder="python", max_filtered_tgids=0),
        "nofilter_native": lambda: NetlinkSource(types=("exit",), decoder="native", max_filtered_tgids=0),
        "all_python": lambda: NetlinkSource(types=("exit",), all_events=True, decoder="python"),
        "all_native": lambda: NetlinkSource(types=("exit",), all_events=True, decoder="native"),
        "pidfd": PidfdSource,
        "poll_psutil_100ms": lambda: PollSource(interval_s=0.1),
        "kill0_1s": lambda: KillPoller(1.0),
        "py_asyncio_minimal": MinimalAsyncioNetlink,
        "py_asyncio_minimal_idle": MinimalAsyncioNetlink,  # the same, left idle before each exit (bench/latency.py)
        "py_thread_minimal": MinimalThreadNetlink,
    }
    return factories[method.removesuffix("_cb")]()

"""`wait_for_exit` and `wait_for_exits`: block until processes have exited, with their status."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from monitor.events import Event, Exited
from monitor.identity import ProcessKey
from monitor.sources import open_source
from monitor.sources.base import EventSource

log = logging.getLogger(__name__)


def _key(target: int | ProcessKey) -> ProcessKey:
    return target if isinstance(target, ProcessKey) else ProcessKey.of(target)


async def wait_on(
    source: EventSource, keys: Iterable[ProcessKey], *, any_: bool = False, timeout: float | None = None,
    on_exit: Callable[[Exited], None] | None = None,
) -> list[Exited]:
    """Watch `keys` on a started source and return their `Exited` events in arrival order:
    all of them, or the first with `any_`. Raises TimeoutError after `timeout` seconds.

    Each is taken by a threaded listener (`set_listener(threaded=True)`): where the source
    reads the kernel in a thread of its own (netlink) that is the reader thread, the
    shortest path from the kernel, and `on_exit` is called right there, before this
    coroutine even wakes (`monitor wait` prints from it): it must be thread-safe. The
    source is this wait's alone meanwhile: other events are dropped, as iterating it would.
    """
    keys = list(keys)
    remaining = set(keys)
    results: list[Exited] = []
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    lock = threading.Lock()  # the reader thread and a timeout may end the wait at once
    finished = False

    def take(event: Event) -> None:
        nonlocal finished
        with lock:
            if finished or not isinstance(event, Exited) or event.key not in remaining:
                return
            remaining.discard(event.key)
            results.append(event)
            if on_exit is not None:
                on_exit(event)
            if any_ or not remaining:
                finished = True
                loop.call_soon_threadsafe(_resolve, done)

    source.set_listener(take, threaded=True)
    try:
        for key in list(remaining):
            if not finished:
                source.watch(key)  # a key found dead here is taken at once
        log.info("waiting for %s with %s", ", ".join(str(k.pid) for k in keys), source.name)
        if not finished:
            await asyncio.wait_for(asyncio.shield(done), timeout)
    finally:
        with lock:
            finished = True
            source.set_listener(None)
            left = list(remaining)
        for key in left:
            source.unwatch(key)
    return list(results)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_for_exits(
    targets: Iterable[int | ProcessKey], *, any_: bool = False, timeout: float | None = None,
    source: str | None = None, **options: Any,
) -> list[Exited]:
    """Wait for processes (PIDs or keys) to exit; NoSuchProcess for a PID that does not exist."""
    deadline = None if timeout is None else time.monotonic() + timeout
    options.setdefault("types", ("exit",))
    async with open_source(source, **options) as src:
        # Keys are taken only once the source is listening, so no exit can fall between.
        keys = [_key(t) for t in targets]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return await wait_on(src, keys, any_=any_, timeout=left)


async def wait_for_exit(target: int | ProcessKey, *, timeout: float | None = None, source: str | None = None, **options: Any) -> Exited:
    """Wait for one process (a PID or a key) to exit and return how it ended."""
    return (await wait_for_exits([target], timeout=timeout, source=source, **options))[0]

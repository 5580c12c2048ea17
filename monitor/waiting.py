"""`wait_for_exit` and `wait_for_exits`: block until processes have exited, with their status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from monitor.events import Event, Exited
from monitor.identity import ProcessKey
from monitor.sources import open_source
from monitor.sources.base import EventSource


def _key(target: int | ProcessKey) -> ProcessKey:
    return target if isinstance(target, ProcessKey) else ProcessKey.of(target)


async def wait_on(
    source: EventSource, keys: Iterable[ProcessKey], *, any_: bool = False, timeout: float | None = None,
    on_exit: Callable[[Exited], None] | None = None, watching: Callable[[], None] | None = None,
) -> list[Exited]:
    """Watch `keys` on a started source and return their `Exited` events in arrival order:
    all of them, or the first with `any_`. Raises TimeoutError after `timeout` seconds.
    `watching` is called once every key is watched (a readiness signal for callers).

    Each is taken by the source's listener (`set_listener`), inside its read callback:
    the shortest path from the kernel, and `on_exit` is called right there, before this
    coroutine even wakes (`monitor wait` prints from it). The source is this wait's alone
    meanwhile: other events are dropped, as iterating it would.
    """
    keys = list(keys)
    remaining = set(keys)
    results: list[Exited] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def take(event: Event) -> None:
        if done.done() or not isinstance(event, Exited) or event.key not in remaining:
            return
        remaining.discard(event.key)
        results.append(event)
        if on_exit is not None:
            on_exit(event)
        if any_ or not remaining:
            done.set_result(None)

    source.set_listener(take)
    try:
        for key in keys:
            if not done.done():
                source.watch(key)  # a key found dead here is taken at once
        if watching is not None:
            watching()
        if not done.done():
            await asyncio.wait_for(asyncio.shield(done), timeout)
    finally:
        source.set_listener(None)
        for key in remaining:
            source.unwatch(key)
    return results


async def wait_for_exits(
    targets: Iterable[int | ProcessKey], *, any_: bool = False, timeout: float | None = None,
    source: str | None = None, **options: Any,
) -> list[Exited]:
    """Wait for processes (PIDs or keys) to exit; NoSuchProcess for a PID that does not exist."""
    deadline = None if timeout is None else time.monotonic() + timeout
    options.setdefault("types", ("exit",))
    targets = list(targets)
    async with open_source(source, **options) as src:
        # Keys are taken only once the source is listening and keeps these PIDs' exits, so
        # one that ends before its watch starts still has the status the kernel sent.
        src.expect(t.pid if isinstance(t, ProcessKey) else t for t in targets)
        keys = [_key(t) for t in targets]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return await wait_on(src, keys, any_=any_, timeout=left)


async def wait_for_exit(target: int | ProcessKey, *, timeout: float | None = None, source: str | None = None, **options: Any) -> Exited:
    """Wait for one process (a PID or a key) to exit and return how it ended."""
    return (await wait_for_exits([target], timeout=timeout, source=source, **options))[0]

"""monitor: know the moment a process really dies, and how, from kernel events.

    import asyncio, monitor

    async def main() -> None:
        async with monitor.open_source() as source:     # netlink, else pidfd, else poll
            source.watch(monitor.ProcessKey.of(pid))
            async for event in source:
                print(event)

    exited = asyncio.run(monitor.wait_for_exit(pid, timeout=60))

Names are imported on first use: the launch wrapper and the CLI start without loading
the engine, asyncio and SQLite they do not need (half their start-up time otherwise).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "AccessDenied": "monitor.errors", "MonitorError": "monitor.errors", "NoSuchProcess": "monitor.errors",
    "SourceFailed": "monitor.errors", "SourceUnavailable": "monitor.errors",
    "Event": "monitor.events", "Execed": "monitor.events", "Exited": "monitor.events", "Forked": "monitor.events",
    "Overrun": "monitor.events", "WaitStatus": "monitor.events",
    "ProcessKey": "monitor.identity",
    "open_source": "monitor.sources", "select_source": "monitor.sources",
    "EventSource": "monitor.sources.base",
    "wait_for_exit": "monitor.waiting", "wait_for_exits": "monitor.waiting",
    "AlreadyDead": "monitor.engine", "Engine": "monitor.engine",
    "LockHeld": "monitor.locks",
    "Client": "monitor.client", "DaemonUnreachable": "monitor.client",
}

__all__ = [
    "AccessDenied", "AlreadyDead", "Client", "DaemonUnreachable", "Engine", "Event", "EventSource", "Execed", "Exited",
    "Forked", "LockHeld", "MonitorError", "NoSuchProcess", "Overrun", "ProcessKey", "SourceFailed", "SourceUnavailable",
    "WaitStatus", "__version__", "open_source", "select_source", "wait_for_exit", "wait_for_exits",
]
assert set(__all__) == {*_WHERE, "__version__"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")


if TYPE_CHECKING:
    from monitor.client import Client, DaemonUnreachable
    from monitor.engine import AlreadyDead, Engine
    from monitor.errors import AccessDenied, MonitorError, NoSuchProcess, SourceFailed, SourceUnavailable
    from monitor.events import Event, Execed, Exited, Forked, Overrun, WaitStatus
    from monitor.identity import ProcessKey
    from monitor.locks import LockHeld
    from monitor.sources import open_source, select_source
    from monitor.sources.base import EventSource
    from monitor.waiting import wait_for_exit, wait_for_exits

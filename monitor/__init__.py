"""monitor: know the moment a process really dies, and how, from kernel events.

    import asyncio, monitor

    async def main() -> None:
        async with monitor.open_source() as source:     # netlink, else pidfd, else poll
            source.watch(monitor.ProcessKey.of(pid))
            async for event in source:
                print(event)

    exited = asyncio.run(monitor.wait_for_exit(pid, timeout=60))
"""

from __future__ import annotations

from monitor.client import Client, DaemonUnreachable
from monitor.engine import AlreadyDead, Engine
from monitor.errors import AccessDenied, MonitorError, NoSuchProcess, SourceFailed, SourceUnavailable
from monitor.events import Event, Execed, Exited, Forked, Overrun, WaitStatus
from monitor.identity import ProcessKey
from monitor.locks import LockHeld
from monitor.sources import open_source, select_source
from monitor.sources.base import EventSource
from monitor.waiting import wait_for_exit, wait_for_exits

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AlreadyDead",
    "Client",
    "DaemonUnreachable",
    "Engine",
    "Event",
    "EventSource",
    "Execed",
    "Exited",
    "Forked",
    "LockHeld",
    "MonitorError",
    "NoSuchProcess",
    "Overrun",
    "ProcessKey",
    "SourceFailed",
    "SourceUnavailable",
    "WaitStatus",
    "__version__",
    "open_source",
    "select_source",
    "wait_for_exit",
    "wait_for_exits",
]

"""Ending asyncio tasks of ours: cancel, then wait until they have ended (a task that is only
cancelled may still be running its cleanup when its owner closes what it uses)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task of ours and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks of ours all at once, then wait until each has ended."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task

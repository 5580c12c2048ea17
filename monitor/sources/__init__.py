"""Choosing a source: probes, `create()`, and `select_source()` (netlink, then pidfd, then poll).

Each probe tries its mechanism once and says exactly why it cannot work. The
Linux-only modules are imported only when their source is asked for, so that
`import monitor` works where they cannot (macOS).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from monitor.errors import SourceUnavailable
from monitor.sources.base import EventSource

log = logging.getLogger(__name__)

SOURCE_NAMES = ("netlink", "pidfd", "inotify", "poll", "fake")
FALLBACK_ORDER = ("netlink", "pidfd", "poll")


def create(name: str, **options: Any) -> EventSource:
    """An unstarted source by name; options that do not concern it are ignored."""
    def pick(*names: str) -> dict[str, Any]:
        return {k: v for k, v in options.items() if k in names and v is not None}

    if name in ("netlink", "pidfd"):
        # `if sys.platform == ...` (not a variable) so that type checkers for macOS skip these.
        if sys.platform == "linux":
            if name == "netlink":
                from monitor.sources.netlink import NetlinkSource

                return NetlinkSource(**pick("types", "all_events", "rcvbuf_bytes", "kernel_filter", "decoder", "netns", "confirm_timeout_s"))
            from monitor.sources.pidfd import PidfdSource

            return PidfdSource(**pick("all_events", "child_scan_interval_s"))
        raise SourceUnavailable(name, f"{name} is Linux-only (this is {sys.platform})")
    if name == "inotify":
        from monitor.sources.inotify import ExitFileSource

        if options.get("exit_dir") is None:
            raise SourceUnavailable(name, "needs the directory of the wrapper's exit files (--exit-dir)")
        return ExitFileSource(options["exit_dir"], **pick("all_events"))
    if name == "poll":
        from monitor.sources.poll import PollSource

        return PollSource(**pick("all_events", "interval_s"))
    if name == "fake":
        from monitor.sources.fake import FakeSource

        return FakeSource(**pick("all_events"))
    raise ValueError(f"unknown source {name!r}: choose from {', '.join(SOURCE_NAMES)}")


async def select_source(name: str | None = None, **options: Any) -> EventSource:
    """A started source: `name` if given (SourceUnavailable if it cannot work), else the
    first of netlink, pidfd, poll that works here, logging why each fallback happened."""
    if name is not None:
        source = create(name, **options)
        await source.start()
        return source
    reasons = []
    for candidate in FALLBACK_ORDER:
        try:
            source = create(candidate, **options)
            await source.start()
        except SourceUnavailable as err:
            reasons.append(str(err))
            log.warning("source %s unavailable: %s; falling back", candidate, err.reason)
            continue
        return source
    raise SourceUnavailable("any", "; ".join(reasons))


@contextlib.asynccontextmanager
async def open_source(name: str | None = None, **options: Any) -> AsyncIterator[EventSource]:
    """`async with open_source() as source:` a started source, closed on the way out."""
    source = await select_source(name, **options)
    try:
        yield source
    finally:
        await source.close()


@dataclass(slots=True)
class Probe:
    name: str
    available: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


async def probe(name: str, **options: Any) -> Probe:
    """Start the source for real once and report what happened."""
    try:
        source = create(name, **options)
        await source.start()
    except SourceUnavailable as err:
        return Probe(name, False, err.reason)
    except Exception as err:  # a probe reports, it does not crash doctor
        return Probe(name, False, f"{type(err).__name__}: {err}")
    try:
        return Probe(name, True, "works", source.stats())
    finally:
        await source.close()

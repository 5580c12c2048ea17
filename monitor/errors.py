"""The one exception tree of monitor.

    MonitorError                 base of everything monitor raises on purpose
    ├── NoSuchProcess            no process has that PID (or it is no longer the one named)
    ├── AccessDenied             the kernel refused to tell or to act (EPERM/EACCES)
    ├── SourceUnavailable        an event source cannot work here; `reason` says exactly why
    └── SourceFailed             a source that was working broke (its socket died, ...)

Raw `OSError`s are translated at exactly one boundary per mechanism, always
`raise ... from err`, so the cause stays visible in tracebacks.
"""

from __future__ import annotations


class MonitorError(Exception):
    """Base of every error monitor raises on purpose."""


class NoSuchProcess(MonitorError):
    """No process with this PID exists (or it is not the process the key names)."""

    def __init__(self, pid: int, message: str | None = None) -> None:
        self.pid = pid
        super().__init__(message or f"no process with PID {pid}")


class AccessDenied(MonitorError):
    """The kernel refused access to the process or the facility."""


class SourceUnavailable(MonitorError):
    """An event source cannot work on this machine; `reason` says exactly why."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class SourceFailed(MonitorError):
    """A working source broke and cannot go on."""

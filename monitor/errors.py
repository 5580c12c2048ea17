"""The one exception tree of monitor.

    MonitorError                 base of everything monitor raises on purpose
    ├── NoSuchProcess            no process has that PID (or it is no longer the one named)
    ├── AccessDenied             the kernel refused to tell or to act (EPERM/EACCES)
    ├── SourceUnavailable        an event source cannot work here; `reason` says exactly why
    ├── SourceFailed             a source that was working broke (its socket died, ...)
    └── StorageError             the state file refused a write or a read; `kind` says how

Raw `OSError`s are translated at exactly one boundary per mechanism, always
`raise ... from err`, so the cause stays visible in tracebacks.
"""

from __future__ import annotations

from typing import ClassVar


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


class StorageError(MonitorError):
    """The state store failed: `kind` is what SQLite said in words a user acts on
    ("disk full", "I/O error", "read-only", "corrupt", "busy", ...)."""

    KINDS: ClassVar[dict[int, str]] = {  # SQLite primary result codes (https://www.sqlite.org/rescode.html)
        5: "busy", 6: "locked", 7: "out of memory", 8: "read-only", 10: "I/O error", 11: "corrupt",
        13: "disk full", 14: "cannot open", 26: "not a database",
    }

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"state store: {kind} ({detail})")

    @classmethod
    def of(cls, err: Exception) -> StorageError:
        """The SQLite (or OS) error `err`, named by its result code."""
        code = getattr(err, "sqlite_errorcode", None)
        errno_ = getattr(err, "errno", None)
        if code is not None:
            kind = cls.KINDS.get(code & 0xFF, "error")
        elif errno_ == 28:  # ENOSPC from a file the store writes itself
            kind = "disk full"
        else:
            kind = "error"
        return cls(kind, str(err))

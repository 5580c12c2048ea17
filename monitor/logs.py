"""Logging setup for the daemon and the CLI: one root handler in the text, journald or JSON format.

Library modules only call `logging.getLogger(__name__)`; `configure_logging()` is for the
entry points, and calling it again (SIGHUP) replaces its handler rather than adding one.

    text      2025-01-02T03:04:05.678+00:00 monitor: INFO monitor.engine: message
              (no timestamp when the stream is the journal)
    journald  <6>INFO monitor.engine: message
              the sd-daemon(3) priority prefix on every line, which journald turns into
              PRIORITY=; continuation lines are indented
    json      {"ts": "2025-01-02T03:04:05.678Z", "level": "info", "logger": "monitor.engine", "message": "...", ...}
              plus "exc" (the traceback), "stack" and the caller's `extra` fields
    auto      journald when $JOURNAL_STREAM names the stream's device:inode, else text
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, TextIO

LOG_FORMATS = ("auto", "text", "journald", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# sd-daemon(3): SD_ERR "<3>", SD_WARNING "<4>", SD_INFO "<6>", SD_DEBUG "<7>"; CRITICAL is SD_CRIT.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

# What every LogRecord carries; anything else on a record came from the caller's `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class _Handler(logging.StreamHandler[TextIO]):
    """The handler configure_logging() installs: marked by its class, so a second call finds it."""


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Log records of `level` and above from every logger to `stream` (stderr) in `fmt`.

    Replaces the handler of an earlier call; other handlers on the root logger (pytest's,
    an embedding application's) are left alone.
    """
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    stream = stream if stream is not None else sys.stderr
    journal = is_journal_stream(stream)
    if fmt == "auto":
        fmt = "journald" if journal else "text"
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    elif fmt == "journald":
        formatter = JournaldFormatter()
    else:
        formatter = TextFormatter(timestamps=not journal)
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()  # a StreamHandler never closes its stream: stderr stays open
    root.addHandler(handler)
    root.setLevel(level.upper())


def is_journal_stream(stream: TextIO) -> bool:
    """Whether `stream` is connected to the journal: systemd.exec(5) sets $JOURNAL_STREAM to
    "DEVICE:INODE" of the stdout/stderr it connects to journald, to be compared with fstat()."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.strip().split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # Malformed, or a stream with no descriptor (StringIO raises io.UnsupportedOperation, a ValueError/OSError).
        return False
    # Inherited by a child whose stderr was redirected elsewhere: only the very file counts.
    return (st.st_dev, st.st_ino) == (device, inode)


def _local_time(created: float) -> str:
    return datetime.datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def _utc_time(created: float) -> str:
    return datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`[TIMESTAMP ]monitor: LEVEL logger: message`, as the CLI has always printed."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__("monitor: %(levelname)s %(name)s: %(message)s")
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{_local_time(record.created)} {text}" if self.timestamps else text


class JournaldFormatter(logging.Formatter):
    """`<PRIORITY>LEVEL logger: message` for a stream journald reads, without a timestamp.

    journald's stream transport ends a record at every newline (systemd-journald.service(8)),
    so a multi-line message or traceback would become several records, the later ones at
    the unit's default priority. Each continuation line therefore carries the record's
    priority prefix too, and is indented so it reads as part of the record before it.
    """

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        first, *rest = super().format(record).rstrip("\n").split("\n")
        return "\n".join([prefix + first, *(f"{prefix}    {line}" for line in rest)])


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels: that of the next standard level below)."""
    for standard in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= standard:
            return _PRIORITY[standard]
    return _PRIORITY[logging.DEBUG]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC, ms), level, logger, message, exc, stack and extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _utc_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in data:  # an extra never hides a core field
                data[key] = _json_safe(value)
        return json.dumps(data, default=str)


def _json_safe(value: Any) -> Any:
    """`value` if json.dumps() (with str() for unknown objects) can take it, else str(value)."""
    try:
        json.dumps(value, default=str)
    except (ValueError, TypeError, RecursionError):  # circular, non-string keys, too deep
        return str(value)
    return value

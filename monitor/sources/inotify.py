"""Exit files: the launch wrapper's record of how its command ended, seen through inotify.

The wrapper (monitor.wrapper) writes `<id>.exit` atomically (temp file, then
rename) holding JSON with the command's process key and raw wait status, so the
status survives a monitor that was down when the command ended. Files already in
the directory at start are read too. This source sees only commands started by
the wrapper; a wrapper killed with SIGKILL writes nothing, which is why the
engine also verifies keys on its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from monitor.errors import SourceUnavailable
from monitor.events import EXIT_FILE
from monitor.identity import ProcessKey
from monitor.sources.base import EventSource, Watch

log = logging.getLogger(__name__)

EXIT_SUFFIX = ".exit"


def read_exit_file(path: Path) -> tuple[ProcessKey, int | None]:
    """(key, raw wait status) from one exit file; ValueError when it is malformed."""
    try:
        data: Any = json.loads(path.read_bytes())
        status = data["wait_status"]
        return ProcessKey.from_dict(data["key"]), None if status is None else int(status)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"bad exit file {path}: {err}") from err


class ExitFileSource(EventSource):
    """`Exited` events from the exit files written into one directory."""

    name = "inotify"
    supports_all_events = True
    found_dead_evidence = EXIT_FILE

    def __init__(self, directory: str | os.PathLike[str], *, all_events: bool = False) -> None:
        super().__init__(all_events=all_events)
        self.directory = Path(directory)
        self._by_key: dict[ProcessKey, int | None] = {}
        self._inotify: Any = None

    async def _start(self) -> None:
        try:
            from inotify_simple import INotify, flags
        except ImportError as err:
            raise SourceUnavailable(self.name, "the inotify_simple module is missing") from err
        if not self.directory.is_dir():
            raise SourceUnavailable(self.name, f"exit-file directory {self.directory} does not exist")
        try:
            self._inotify = INotify(nonblocking=True)
            self._inotify.add_watch(self.directory, flags.MOVED_TO | flags.CLOSE_WRITE)
        except OSError as err:
            raise SourceUnavailable(self.name, f"inotify on {self.directory}: {err.strerror}") from err
        assert self._loop is not None
        self._loop.add_reader(self._inotify.fileno(), self._on_readable)
        for path in sorted(self.directory.glob("*" + EXIT_SUFFIX)):
            self._on_file(path)

    async def _close(self) -> None:
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def _on_readable(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except OSError as err:
            self._fail(err)
            return
        for event in events:
            if event.mask & 0x4000:  # IN_Q_OVERFLOW: rescan the directory
                self._overrun()
                for path in sorted(self.directory.glob("*" + EXIT_SUFFIX)):
                    self._on_file(path)
            elif event.name.endswith(EXIT_SUFFIX):
                self._on_file(self.directory / event.name)

    def _on_file(self, path: Path) -> None:
        try:
            key, status = read_exit_file(path)
        except ValueError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                return  # gone already: the daemon removes a launch's files once its stop is stored
            log.warning("%s", err)
            return
        if key in self._by_key:
            return
        self._by_key[key] = status
        watch = self._watches.get(key.pid)
        if watch is not None and watch.key == key:
            self._finish(watch, status, EXIT_FILE)
        elif self.all_events:
            self._emit_exit(Watch(key), status, EXIT_FILE)

    # An exit file is this source's only evidence: without one the process counts
    # as alive here, however it looks (the wrapper may be writing the file now).
    def _alive(self, watch: Watch) -> bool:
        return watch.key not in self._by_key

    def _exit_status(self, watch: Watch) -> int | None:
        return self._by_key.get(watch.key)

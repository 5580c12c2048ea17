"""The role side's line protocol: answers go out as single lines on stdout, requests come in
as lines on stdin, read from the event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


def say(line: str) -> None:
    os.write(1, line.encode() + b"\n")


class StdinLines:
    """Calls `handler(line)` for each line on stdin, from the event loop; `on_eof()` at EOF."""

    def __init__(self, handler: Callable[[str], None], on_eof: Callable[[], object]) -> None:
        self._buf = b""
        self._handler = handler
        self._on_eof = on_eof
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(0, self._readable)

    def _readable(self) -> None:
        data = os.read(0, 1 << 16)
        if not data:
            self._loop.remove_reader(0)
            self._on_eof()
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                self._handler(line.decode())
            except Exception as err:  # the harness must hear of it, not wait for an answer
                say(f"ERR {type(err).__name__}: {err}")

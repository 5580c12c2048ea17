"""The Python client of the daemon's socket, used by the CLI and by other programs.

    with Client() as client:                       # $MONITOR_SOCKET or the default path
        session = client.call("session.attach", pid=4242)
        for event in client.subscribe(types=["session.stopped"], since=last_seen_id):
            last_seen_id = event["id"]              # resume from here after a reconnect
            ...

Before it sends anything, the client makes sure that it talks to root's daemon or to
its own: the socket and every directory on the way to it belong to root or to the
caller and no one else may write them (monitor.trust), and the process that answers
runs as root or as the caller (SO_PEERCRED). Otherwise: UntrustedSocket, and nothing
was sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monitor.config import default_paths
from monitor.errors import MonitorError
from monitor.protocol import ProtocolError, encode
from monitor.trust import UntrustedSocket, check_peer, check_socket_path

__all__ = ["Client", "DaemonUnreachable", "UntrustedSocket", "socket_path"]


class DaemonUnreachable(MonitorError):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"no monitor daemon answers on {path} ({reason}); start one with: monitor daemon")


SYSTEM_SOCKET = Path("/run/monitor/monitor.sock")  # root's daemon, the one every user may talk to


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The socket named, else $MONITOR_SOCKET, else this user's daemon's; a user who runs none
    (no socket there) talks to root's, as users of a host whose service is root's do."""
    if explicit:
        return Path(explicit)
    if os.environ.get("MONITOR_SOCKET"):
        return Path(os.environ["MONITOR_SOCKET"])
    own = default_paths()[0]
    if not own.exists() and own != SYSTEM_SOCKET and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return own


def connect(sock: socket.socket, path: str, timeout_s: float | None) -> None:
    """connect(2), waiting while the daemon's backlog is full: a Unix socket answers EAGAIN
    then, and Python's timeout handling only waits on EINPROGRESS (unix(7))."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{path}: the daemon accepts no connection (its backlog is full)") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class Client:
    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout_s: float | None = 30.0) -> None:
        self.path = socket_path(path)
        trusted = frozenset({0, os.geteuid()})
        try:
            real = check_socket_path(self.path, trusted)
        except OSError as err:  # nothing there (or nothing we may see): no daemon, not an impostor
            raise DaemonUnreachable(self.path, err.strerror or str(err)) from None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            connect(self._sock, str(real), timeout_s)
            check_peer(self._sock, self.path, trusted)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            self._sock.close()
            raise DaemonUnreachable(self.path, err.strerror or str(err)) from None
        except BaseException:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")
        self._next_id = 0
        self.subscription: dict[str, Any] = {}  # the answer to subscribe: last_id, missed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def shutdown(self) -> None:
        """End a subscription that another thread is blocked reading: its iterator ends (a
        subscription has no timeout, and closing the socket would not wake that read)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _send(self, method: str, params: dict[str, Any]) -> int:
        self._next_id += 1
        self._sock.sendall(encode({"id": self._next_id, "method": method, "params": params}))
        return self._next_id

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise DaemonUnreachable(self.path, "the daemon closed the connection")
        data: dict[str, Any] = json.loads(line)
        return data

    def call(self, method: str, **params: Any) -> Any:
        """The method's result; ProtocolError (with its stable code) when the daemon says no."""
        request_id = self._send(method, params)
        answer = self._read()
        if "error" in answer:
            raise ProtocolError(answer["error"]["code"], answer["error"]["message"])
        if answer.get("id") != request_id:
            raise ProtocolError("internal", f"answer for request {answer.get('id')}, expected {request_id}")
        return answer["result"]

    def subscribe(self, types: list[str] | None = None, *, session: str | None = None,
                  since: int | None = None) -> Iterator[dict[str, Any]]:
        """The daemon's committed events, one dict each (`id` is the event's place in the log):
        those after event `since` first, when given, then every new one, until the daemon
        closes. Subscribed at once, not at the first iteration. A subscriber that falls too
        far behind is cut off: ProtocolError("too_slow"); resubscribe with `since`."""
        self._sock.settimeout(None)
        params = {k: v for k, v in {"types": types, "session": session, "since": since}.items() if v is not None}
        self.subscription = self.call("events.subscribe", **params)
        return self._events()

    def _events(self) -> Iterator[dict[str, Any]]:
        while line := self._file.readline():
            message = json.loads(line)
            if "error" in message:
                raise ProtocolError(message["error"]["code"], message["error"]["message"])
            yield message["event"]

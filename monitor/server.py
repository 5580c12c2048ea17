"""The daemon's Unix-socket API: peer credentials, authorization, limits, dispatch.

Every connection's peer is taken from SO_PEERCRED (the kernel's word, not the
client's). Root may do anything; another uid sees everything, but stops, unlocks
and cancels only what it created, and attaches only processes it owns. PIDs 0
and 1 and the daemon's own are refused. A bad request gets an error answer with a
stable code and the connection (and every other client) goes on being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor import __version__
from monitor.engine import AlreadyDead, AlreadyFollowed, Engine
from monitor.errors import AccessDenied, MonitorError, NoSuchProcess, StorageError
from monitor.events import TRANSITION_TYPES
from monitor.fuses import NoFuse
from monitor.identity import read_stat
from monitor.launcher import Launcher, LaunchFailed
from monitor.locks import LockHeld, NotLocked
from monitor.metrics import Metrics
from monitor.protocol import (
    BAD_REQUEST,
    CONFLICT,
    FORBIDDEN,
    INTERNAL,
    LOCK_HELD,
    MAX_FRAME_BYTES,
    NOT_FOUND,
    PROTOCOL_VERSION,
    STORAGE,
    ProtocolError,
    Request,
    decode_request,
    encode,
    error,
    param,
    result,
)
from monitor.store import Record
from monitor.tracker import Session, UnknownSession
from monitor.webhooks import UnknownDelivery, Webhooks

log = logging.getLogger(__name__)

SO_PEERCRED_FORMAT = struct.Struct("3i")  # struct ucred: pid, uid, gid
DEFAULT_SUBSCRIBER_BUFFER = 10_000  # events a subscriber may fall behind before it is cut off
CUT_OFF_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def root(self) -> bool:
        return self.uid == 0


def peer_of(sock: socket.socket) -> Peer:
    """Who is at the other end, in the kernel's words (credentials as of connect())."""
    if sys.platform != "linux":
        raise MonitorError("peer credentials are read with SO_PEERCRED, which needs Linux")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SO_PEERCRED_FORMAT.size)
    pid, uid, gid = SO_PEERCRED_FORMAT.unpack(creds)
    return Peer(pid, uid, gid)


def process_uid(pid: int) -> int:
    """The real uid of a process (the first of /proc/PID/status Uid:)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        raise NoSuchProcess(pid) from None
    raise AccessDenied(f"cannot read the owner of process {pid}")


def _seconds(params: dict[str, Any], name: str) -> float | None:
    value = param(params, name, (int, float), None)
    if value is not None and value <= 0:
        raise ProtocolError(BAD_REQUEST, f"parameter {name!r} must be positive")
    return None if value is None else float(value)


def _hooks(params: dict[str, Any]) -> dict[str, str | None]:
    """A session's own hooks: shell commands run as its owner (the peer), never as the daemon."""
    return {"on_start": param(params, "on_start", str, None), "on_complete": param(params, "on_complete", str, None)}


def monitors_own(pid: int, asking: int) -> bool:
    """Whether `pid` is monitor's own: the daemon, the client asking, or a child of the daemon
    (a launch's wrapper, a hook, a fuse action). A launched command is its wrapper's child, so
    it is not; a process that is gone is nobody's."""
    if pid in (os.getpid(), asking):
        return True
    stat = read_stat(pid)
    return stat is None or stat.ppid == os.getpid()


class Api:
    """The methods, each checked against the peer before it touches the engine."""

    def __init__(self, engine: Engine, started_at: float, launcher: Launcher | None = None, *,
                 webhooks: Webhooks | None = None, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.started_at = started_at
        self.launcher = launcher
        self.webhooks = webhooks
        self.metrics = metrics
        self.metrics_problem: str | None = None  # why the HTTP /metrics listener is not serving
        self.methods: dict[str, Callable[[Peer, dict[str, Any]], Awaitable[Any]]] = {
            "hello": self.hello, "daemon.status": self.status,
            "session.attach": self.attach, "session.launch": self.launch,
            "session.list": self.list_sessions, "session.get": self.get,
            "session.stop": self.stop, "session.children": self.children,
            "lock.acquire": self.lock, "lock.release": self.unlock, "lock.list": self.locks, "lock.who": self.who,
            "fuse.set": self.fuse_set, "fuse.extend": self.fuse_extend, "fuse.cancel": self.fuse_cancel,
            "fuse.list": self.fuses, "metrics": self.render_metrics,
            "webhook.list": self.webhook_list, "webhook.retry": self.webhook_retry, "webhook.enable": self.webhook_enable,
        }

    async def call(self, peer: Peer, request: Request) -> Any:
        method = self.methods.get(request.method)
        if method is None:
            raise ProtocolError(NOT_FOUND, f"unknown method {request.method!r}")
        try:
            return await method(peer, request.params)
        except (UnknownSession, NoFuse, NotLocked, NoSuchProcess, UnknownDelivery) as err:
            raise ProtocolError(NOT_FOUND, str(err)) from None
        except LockHeld as err:
            raise ProtocolError(LOCK_HELD, str(err)) from None
        except (AlreadyDead, AlreadyFollowed) as err:
            raise ProtocolError(CONFLICT, str(err)) from None
        except LaunchFailed as err:
            raise ProtocolError(CONFLICT, str(err)) from None
        except AccessDenied as err:
            raise ProtocolError(FORBIDDEN, str(err)) from None
        except StorageError as err:
            raise ProtocolError(STORAGE, str(err)) from None
        except ValueError as err:
            raise ProtocolError(BAD_REQUEST, str(err)) from None

    def _deny(self, peer: Peer, what: str) -> ProtocolError:
        log.warning("denied uid %d (pid %d): %s", peer.uid, peer.pid, what)
        return ProtocolError(FORBIDDEN, what)

    def _own(self, peer: Peer, owner_uid: int | None, what: str) -> None:
        if not peer.root and owner_uid != peer.uid:
            raise self._deny(peer, f"{what} belongs to another user")

    # -- methods ----------------------------------------------------------------------------

    async def hello(self, peer: Peer, params: dict[str, Any]) -> Any:
        source = self.engine.source.name if self.engine.source else None
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "source": source, "pid": os.getpid(),
                "peer": {"pid": peer.pid, "uid": peer.uid}}

    async def status(self, peer: Peer, params: dict[str, Any]) -> Any:
        source = self.engine.source
        return {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started_at, 3),
                "source": source.name if source else None, "source_stats": source.stats() if source else {},
                "sessions_running": len(self.engine.sessions()), "locks": len(self.engine.locks.locks),
                "fuses": len(self.engine.fuses.fuses), "state_db": str(self.engine.state_path),
                "store": self.engine.store_failure or "ok", "metrics_problem": self.metrics_problem}

    async def attach(self, peer: Peer, params: dict[str, Any]) -> Any:
        pid = param(params, "pid", int, required=True)
        if pid <= 1 or pid == os.getpid():
            raise self._deny(peer, f"PID {pid} cannot be attached")
        if not peer.root and process_uid(pid) != peer.uid:
            raise self._deny(peer, f"process {pid} belongs to another user")
        labels = param(params, "labels", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ProtocolError(BAD_REQUEST, "labels map strings to strings")
        policy = param(params, "policy", str, "root")
        if policy not in ("root", "tree"):
            raise ProtocolError(BAD_REQUEST, "policy is root or tree")
        session = await self.engine.attach(
            pid, cwd=param(params, "cwd", str, None), labels=labels, policy=policy, timeout_s=_seconds(params, "timeout_s"),
            kill_on_timeout=param(params, "kill_on_timeout", bool, False), lock=param(params, "lock", bool, True),
            force=param(params, "force", bool, False), owner_uid=peer.uid, **_hooks(params))
        return session.public()

    async def launch(self, peer: Peer, params: dict[str, Any]) -> Any:
        """Run a command as a session, as the peer's own uid (root's daemon), or refused."""
        if self.launcher is None:
            raise ProtocolError("unavailable", "this daemon does not launch")
        if not peer.root and os.geteuid() != 0 and peer.uid != os.geteuid():
            raise self._deny(peer, "this daemon runs as another user and can launch only as itself")
        argv = param(params, "argv", list, required=True)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ProtocolError(BAD_REQUEST, "argv is a non-empty list of strings")
        env = param(params, "env", dict, {})
        labels = param(params, "labels", dict, {})
        for name, mapping in (("env", env), ("labels", labels)):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
                raise ProtocolError(BAD_REQUEST, f"{name} maps strings to strings")
        session = await self.launcher.launch(
            argv, cwd=param(params, "cwd", str, required=True), env=env, uid=peer.uid, gid=peer.gid, labels=labels,
            policy="tree" if param(params, "tree", bool, False) else "root", timeout_s=_seconds(params, "timeout_s"),
            kill_on_timeout=param(params, "kill_on_timeout", bool, False), lock=param(params, "lock", bool, True),
            force=param(params, "force", bool, False), log=param(params, "log", str, None), **_hooks(params))
        return session.public()

    async def list_sessions(self, peer: Peer, params: dict[str, Any]) -> Any:
        include = param(params, "all", bool, False)
        return [s.public() for s in sorted(self.engine.sessions(include_stopped=include), key=lambda s: s.started_at)]

    async def get(self, peer: Peer, params: dict[str, Any]) -> Any:
        return self.engine.session(param(params, "id", str, required=True)).public()

    async def stop(self, peer: Peer, params: dict[str, Any]) -> Any:
        session = self.engine.session(param(params, "id", str, required=True))
        self._own(peer, session.owner_uid, f"session {session.id}")
        name = param(params, "signal", (str, int), "TERM")
        try:
            signum = int(name) if isinstance(name, int) else signal.Signals["SIG" + name.upper().removeprefix("SIG")].value
        except KeyError:
            raise ProtocolError(BAD_REQUEST, f"unknown signal {name!r}") from None
        grace = _seconds(params, "grace_s") or 5.0
        await self.engine.stop(session.id, signum, grace)
        wait = param(params, "wait", bool, True)
        if wait:  # report the death it saw, within the grace (and the KILL after it)
            await self._stopped(session, grace + 5.0)
        return session.public()

    async def _stopped(self, session: Session, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while session.state == "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def children(self, peer: Peer, params: dict[str, Any]) -> Any:
        session = self.engine.session(param(params, "id", str, required=True))
        return {"children": [c.to_dict() for c in session.children.values()],
                "blocking": [c.to_dict() for c in self.engine.blocking_children(session.id)]}

    async def lock(self, peer: Peer, params: dict[str, Any]) -> Any:
        lock = await self.engine.lock(param(params, "directory", str, required=True), by=param(params, "by", str, None),
                                      reason=param(params, "reason", str, None), owner_uid=peer.uid)
        return lock.public()

    async def unlock(self, peer: Peer, params: dict[str, Any]) -> Any:
        directory = os.path.realpath(param(params, "directory", str, required=True))
        lock = self.engine.locks.locks.get(directory)
        if lock is None:
            raise NotLocked(directory)
        self._own(peer, lock.owner_uid, f"the lock on {directory}")
        await self.engine.unlock(directory)
        return lock.public()

    async def locks(self, peer: Peer, params: dict[str, Any]) -> Any:
        return [lock.public() for lock in sorted(self.engine.locks.locks.values(), key=lambda lk: lk.directory)]

    async def who(self, peer: Peer, params: dict[str, Any]) -> Any:
        found = await self.engine.who_uses(param(params, "directory", str, required=True))
        return [p for p in found if not monitors_own(p["pid"], peer.pid)]

    async def fuse_set(self, peer: Peer, params: dict[str, Any]) -> Any:
        ttl = _seconds(params, "ttl_s")
        if ttl is None:
            raise ProtocolError(BAD_REQUEST, "missing parameter 'ttl_s'")
        directory = os.path.realpath(param(params, "directory", str, required=True))
        existing = self.engine.fuses.fuses.get(directory)
        if existing is not None:
            self._own(peer, existing.owner_uid, f"the fuse on {directory}")
        fuse = await self.engine.fuse_set(directory, ttl, param(params, "action", str, None), owner_uid=peer.uid)
        return fuse.to_dict()

    async def fuse_extend(self, peer: Peer, params: dict[str, Any]) -> Any:
        directory = os.path.realpath(param(params, "directory", str, required=True))
        self._own(peer, self.engine.fuses.get(directory).owner_uid, f"the fuse on {directory}")
        by = _seconds(params, "by_s")
        if by is None:
            raise ProtocolError(BAD_REQUEST, "missing parameter 'by_s'")
        return (await self.engine.fuse_extend(directory, by)).to_dict()

    async def fuse_cancel(self, peer: Peer, params: dict[str, Any]) -> Any:
        directory = os.path.realpath(param(params, "directory", str, required=True))
        self._own(peer, self.engine.fuses.get(directory).owner_uid, f"the fuse on {directory}")
        return (await self.engine.fuse_cancel(directory)).to_dict()

    async def fuses(self, peer: Peer, params: dict[str, Any]) -> Any:
        return [f.to_dict() for f in sorted(self.engine.fuses.fuses.values(), key=lambda f: f.directory)]

    async def render_metrics(self, peer: Peer, params: dict[str, Any]) -> Any:
        """The Prometheus text exposition, as of now."""
        if self.metrics is None:
            raise ProtocolError("unavailable", "this daemon keeps no metrics")
        self.metrics.refresh()
        return self.metrics.render()

    def _webhooks(self) -> Webhooks:
        if self.webhooks is None:
            raise ProtocolError("unavailable", "this daemon sends no webhooks")
        return self.webhooks

    async def webhook_list(self, peer: Peer, params: dict[str, Any]) -> Any:
        """Endpoints (never their secrets) and the latest deliveries, or only the failed ones."""
        webhooks = self._webhooks()
        limit = param(params, "limit", int, 100)
        if not 1 <= limit <= 10_000:
            raise ProtocolError(BAD_REQUEST, "limit is 1 to 10000")
        return {"endpoints": webhooks.status(),
                "deliveries": await webhooks.deliveries(failed_only=param(params, "failed", bool, False), limit=limit)}

    def _administrator(self, peer: Peer, what: str) -> None:
        """Webhooks are the config's, so their administration is root's (or the daemon user's)."""
        if not peer.root and peer.uid != os.geteuid():
            raise self._deny(peer, f"{what} is for root")

    async def webhook_retry(self, peer: Peer, params: dict[str, Any]) -> Any:
        self._administrator(peer, "retrying a webhook delivery")
        return await self._webhooks().retry(param(params, "id", int, required=True))

    async def webhook_enable(self, peer: Peer, params: dict[str, Any]) -> Any:
        self._administrator(peer, "enabling a webhook endpoint")
        return self._webhooks().enable(param(params, "name", str, required=True))


class Server:
    """asyncio Unix-socket server: one task per connection, bounded in number and idle time."""

    def __init__(self, api: Api, path: Path, *, max_connections: int = 256, idle_timeout_s: float = 600.0,
                 subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER) -> None:
        self.api = api
        self.path = path
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.subscriber_buffer = subscriber_buffer
        self.dropped_subscribers = 0
        self.on_drop: Callable[[], None] | None = None  # told of each subscriber cut off (metrics)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._subscribers: set[Subscriber] = set()
        api.engine.add_record_listener(self._publish)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def start(self) -> None:
        sock = bind_socket(self.path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_FRAME_BYTES + 1)

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (briefly), close the rest."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for subscriber in self._subscribers:
            subscriber.close()
        if self._connections:
            _done, pending = await asyncio.wait(self._connections, timeout=2.0)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _publish(self, record: Record) -> None:
        """Hand a committed event to every subscriber that wants it; never waits. One whose
        buffer is full is cut off, so it can slow neither the daemon nor anyone else."""
        for subscriber in list(self._subscribers):
            if subscriber.wants(record) and not subscriber.offer(record):
                self._subscribers.discard(subscriber)
                self.dropped_subscribers += 1
                if self.on_drop is not None:
                    self.on_drop()
                log.warning("a subscriber fell %d events behind; disconnected", self.subscriber_buffer)
                subscriber.cut_off(f"fell more than {self.subscriber_buffer} events behind; resubscribe with since")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > self.max_connections:
                writer.write(error(None, "unavailable", f"too many connections (at most {self.max_connections})"))
                await writer.drain()
                return
            peer = peer_of(writer.get_extra_info("socket"))
            await self._requests(peer, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _requests(self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout_s):  # no task per request, unlike wait_for
                    line = await reader.readuntil(b"\n")
            except TimeoutError:
                return
            except asyncio.LimitOverrunError:
                writer.write(error(None, "too_large", f"a request may be at most {MAX_FRAME_BYTES} bytes"))
                await writer.drain()
                return  # the rest of that line cannot be told from the next request
            except asyncio.IncompleteReadError as err:
                if err.partial.strip():
                    writer.write(error(None, BAD_REQUEST, "a request ends with a newline"))
                    await writer.drain()
                return
            if not line.strip():
                continue
            try:
                request = decode_request(line)
            except ProtocolError as err:
                writer.write(error(None, err.code, err.message))
                await writer.drain()
                continue
            if request.method == "events.subscribe":
                await self._stream(request, writer)
                return
            try:
                answer = result(request.id, await self.api.call(peer, request))
            except ProtocolError as err:
                answer = error(request.id, err.code, err.message)
            except MonitorError as err:
                answer = error(request.id, BAD_REQUEST, str(err))
            except Exception as err:
                log.exception("method %s failed", request.method)
                answer = error(request.id, INTERNAL, f"{type(err).__name__}: {err}")
            writer.write(answer)
            await writer.drain()

    async def _stream(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """events.subscribe: committed events (of some types, of one session) from `since`, then live.

        Registered before the backlog is read, so nothing committed in between is missed;
        what both the backlog and the live feed carry goes out once (by id)."""
        try:
            types = param(request.params, "types", list, None)
            if types is not None and not all(t in TRANSITION_TYPES for t in types):
                raise ProtocolError(BAD_REQUEST, f"types is a list of event types: {', '.join(TRANSITION_TYPES)}")
            session = param(request.params, "session", str, None)
            since = param(request.params, "since", int, None)
            if since is not None and since < 0:
                raise ProtocolError(BAD_REQUEST, "since is an event id (0: from the oldest kept)")
            if session is not None:  # a session nobody knows would be waited on for ever
                try:
                    session = self.api.engine.session(session).id
                except UnknownSession as err:
                    raise ProtocolError(NOT_FOUND, str(err)) from None
        except ProtocolError as err:
            writer.write(error(request.id, err.code, err.message))
            await writer.drain()
            return
        subscriber = Subscriber(writer, request.id, types, session, self.subscriber_buffer)
        self._subscribers.add(subscriber)
        try:
            last = await self.api.engine.last_event_id()
            if since is not None and since > last:
                # An id this log never gave (another daemon's, a typo): taken as given, every
                # event up to it would be skipped without a word.
                writer.write(error(request.id, BAD_REQUEST, f"since {since} is after the last event ({last})"))
                await writer.drain()
                return
            backlog = await self.api.engine.records(since, 1000) if since is not None else []
            missed = since is not None and (backlog[0].seq or 0 if backlog else last + 1) > since + 1
            writer.write(result(request.id, {"subscribed": True, "last_id": last, "missed": missed}))
            await writer.drain()
            sent = since if since is not None else last
            while backlog:
                for record in backlog:
                    if subscriber.wants(record):
                        await subscriber.send(record)
                sent = backlog[-1].seq or sent
                backlog = await self.api.engine.records(sent, 1000) if sent < last else []
            while (live := await subscriber.next()) is not None:
                if live.seq is not None and live.seq > sent:
                    await subscriber.send(live)
        finally:
            self._subscribers.discard(subscriber)


class Subscriber:
    """One events.subscribe stream: its filter, and a bounded buffer of what it has not yet read."""

    def __init__(self, writer: asyncio.StreamWriter, request_id: Any, types: list[str] | None, session: str | None,
                 buffer: int) -> None:
        self.writer = writer
        self.request_id = request_id
        self.types = frozenset(types) if types is not None else None
        self.session = session
        self.queue: asyncio.Queue[Record | None] = asyncio.Queue(maxsize=buffer)

    def wants(self, record: Record) -> bool:
        if self.types is not None and record.type not in self.types:
            return False
        return self.session is None or str(record.payload.get("session_id") or "").startswith(self.session)

    def offer(self, record: Record) -> bool:
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            return False
        return True

    async def next(self) -> Record | None:
        return await self.queue.get()

    async def send(self, record: Record) -> None:
        self.writer.write(encode({"id": self.request_id, "event": record.public()}))
        await self.writer.drain()

    def close(self) -> None:
        """The end of the stream (the daemon stops): after what is buffered."""
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        if self.queue.full():
            self.cut_off("the daemon is stopping")

    def cut_off(self, why: str) -> None:
        """Say why, and close. A reader that is stalled for good never reads it, so the
        connection is aborted a little later whatever it does (which ends the stream task)."""
        transport = self.writer.transport
        if transport.is_closing():
            return
        transport.write(error(self.request_id, "too_slow", why))
        transport.close()
        asyncio.get_running_loop().call_later(CUT_OFF_GRACE_S, transport.abort)


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, safely.

    A symlink there is refused (it could point anywhere); a socket there is replaced
    only when no daemon answers on it; anything else there is refused. The socket is
    bound under a umask that leaves no moment with wider permissions than intended,
    in a directory only we can write to.
    """
    path.parent.mkdir(mode=0o755 if os.geteuid() == 0 else 0o700, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise MonitorError(f"{path} is a symbolic link: refusing to use it as the socket")
        if not stat.S_ISSOCK(st.st_mode):
            raise MonitorError(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise MonitorError(f"a daemon is already answering on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # stale: nobody listens
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600, then opened up on purpose below
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise MonitorError(f"{path} is in use") from None
        raise
    finally:
        os.umask(old)
    # Every user may connect; what each may do is decided per request from SO_PEERCRED.
    os.chmod(path, 0o666 if os.geteuid() == 0 else 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock

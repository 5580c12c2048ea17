"""The daemon's Unix-socket API: peer credentials, authorization, limits, dispatch.

Every connection's peer is taken from SO_PEERCRED (the kernel's word, not the
client's). Every request's params are checked against the method's declared schema
(monitor.protocol) before a handler sees them. Root may do anything; another uid sees
everything, but stops, unlocks and cancels only what it created, attaches only
processes it owns, and locks, sets a fuse on or launches in a directory only where it
could itself (checked as that uid: monitor.access). PIDs 0 and 1 and the daemon's own
are refused, and a PID from a client in another PID namespace is translated to ours
(monitor.pidns). A bad request gets an error answer with a stable code and the
connection (and every other client) goes on being served; a bug is one `internal`
answer and one log line that share a request id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import resource
import secrets
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor import __version__
from monitor.access import can_access
from monitor.engine import AlreadyDead, AlreadyFollowed, Engine, process_cwd
from monitor.errors import AccessDenied, MonitorError, NoSuchProcess, StorageError
from monitor.fuses import NoFuse
from monitor.identity import read_stat
from monitor.launcher import Launcher, LaunchFailed
from monitor.locks import LockHeld, NotLocked
from monitor.metrics import Metrics
from monitor.pidns import ForeignNamespace, translate
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
    UNAVAILABLE,
    AttachParams,
    DirectoryParams,
    FuseExtendParams,
    FuseSetParams,
    LaunchParams,
    ListParams,
    LockParams,
    NoParams,
    OrphansParams,
    ProtocolError,
    Request,
    SessionParams,
    StopParams,
    SubscribeParams,
    WebhookEnableParams,
    WebhookListParams,
    WebhookRetryParams,
    decode_params,
    decode_request,
    encode,
    error,
    result,
)
from monitor.store import Record
from monitor.tasks import cancel_all
from monitor.tracker import Session, UnknownSession
from monitor.trust import check_directory, peer_credentials
from monitor.webhooks import UnknownDelivery, Webhooks

if TYPE_CHECKING:
    from monitor.sinks.nats import NatsSink

log = logging.getLogger(__name__)

DEFAULT_SUBSCRIBER_BUFFER = 10_000  # events a subscriber may fall behind before it is cut off
CUT_OFF_GRACE_S = 2.0
CHECKS_AT_ONCE = 8  # as-user access checks (a child process each) running at once
FD_HEADROOM = 256  # open files besides connections: the store, the sources, pidfds, logs


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
    return Peer(*peer_credentials(sock))


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


def request_id() -> str:
    """A short id that ties an `internal` answer to the daemon's log line about it."""
    return secrets.token_hex(4)


def internal(what: str, err: BaseException) -> str:
    """Log an unexpected failure once (its traceback at DEBUG); the answer's message."""
    rid = request_id()
    log.error("request %s: %s failed: %s: %s", rid, what, type(err).__name__, err)
    log.debug("request %s: traceback", rid, exc_info=err)
    return f"internal (request {rid})"


def monitors_own(pid: int, asking: int) -> bool:
    """Whether `pid` is monitor's own: the daemon, the client asking, or a child of the daemon
    (a launch's wrapper, a hook, a fuse action). A launched command is its wrapper's child, so
    it is not; a process that is gone is nobody's."""
    if pid in (os.getpid(), asking):
        return True
    stat = read_stat(pid)
    return stat is None or stat.ppid == os.getpid()


class Api:
    """The methods, each checked against the peer before it touches the engine. A handler
    gets its params as the typed, checked struct that its method's schema declares."""

    def __init__(self, engine: Engine, started_at: float, launcher: Launcher | None = None, *,
                 webhooks: Webhooks | None = None, metrics: Metrics | None = None, nats: NatsSink | None = None) -> None:
        self.engine = engine
        self.nats = nats
        self.started_at = started_at
        self.launcher = launcher
        self.webhooks = webhooks
        self.metrics = metrics
        self._checks = asyncio.Semaphore(CHECKS_AT_ONCE)
        self.metrics_problem: str | None = None  # why the HTTP /metrics listener is not serving
        self.methods: dict[str, Callable[[Peer, Any], Awaitable[Any]]] = {
            "hello": self.hello, "daemon.status": self.status,
            "session.attach": self.attach, "session.launch": self.launch,
            "session.list": self.list_sessions, "session.get": self.get,
            "session.stop": self.stop, "session.children": self.children, "session.orphans": self.orphans,
            "lock.acquire": self.lock, "lock.release": self.unlock, "lock.list": self.locks, "lock.who": self.who,
            "fuse.set": self.fuse_set, "fuse.extend": self.fuse_extend, "fuse.cancel": self.fuse_cancel,
            "fuse.list": self.fuses, "metrics": self.render_metrics,
            "webhook.list": self.webhook_list, "webhook.retry": self.webhook_retry, "webhook.enable": self.webhook_enable,
        }

    async def call(self, peer: Peer, request: Request) -> Any:
        method = self.methods.get(request.method)
        if method is None:
            raise ProtocolError(NOT_FOUND, f"unknown method {request.method!r}")
        params = decode_params(request.method, request.params)
        try:
            return await method(peer, params)
        except (UnknownSession, NoFuse, NotLocked, NoSuchProcess, UnknownDelivery) as err:
            raise ProtocolError(NOT_FOUND, str(err)) from None
        except LockHeld as err:
            raise ProtocolError(LOCK_HELD, str(err)) from None
        except (AlreadyDead, AlreadyFollowed, LaunchFailed) as err:
            raise ProtocolError(CONFLICT, str(err)) from None
        except (AccessDenied, ForeignNamespace) as err:
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

    async def _may(self, peer: Peer, path: str, mode: int, refusal: str) -> None:
        """The peer could itself `mode` (os.W_OK, os.X_OK) `path`, by the kernel's rule; root may."""
        if peer.root:
            return
        async with self._checks:
            allowed = await asyncio.to_thread(can_access, peer.uid, peer.gid, path, mode)
        if not allowed:
            raise self._deny(peer, f"{refusal}: uid {peer.uid} cannot {'write' if mode == os.W_OK else 'enter'} {path}")

    # -- methods ----------------------------------------------------------------------------

    async def hello(self, peer: Peer, params: NoParams) -> Any:
        source = self.engine.source.name if self.engine.source else None
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "source": source, "pid": os.getpid(),
                "peer": {"pid": peer.pid, "uid": peer.uid}}

    async def status(self, peer: Peer, params: NoParams) -> Any:
        source = self.engine.source
        return {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started_at, 3),
                "source": source.name if source else None, "source_stats": source.stats() if source else {},
                "sessions_running": len(self.engine.sessions()), "locks": len(self.engine.locks.locks),
                "fuses": len(self.engine.fuses.fuses), "state_db": str(self.engine.state_path),
                "store": self.engine.store_failure or "ok", "metrics_problem": self.metrics_problem,
                "nats": self.nats.status() if self.nats is not None else None}

    async def attach(self, peer: Peer, p: AttachParams) -> Any:
        pid = await asyncio.to_thread(translate, peer.pid, p.pid)  # the peer's PID namespace may not be ours
        if pid <= 1 or pid == os.getpid():
            raise self._deny(peer, f"PID {p.pid} cannot be attached")
        if not peer.root and process_uid(pid) != peer.uid:
            raise self._deny(peer, f"process {p.pid} belongs to another user")
        cwd = p.cwd
        if p.lock and not p.force and not peer.root:  # its lock is a lock like any other
            if cwd is None:
                try:
                    cwd = os.path.realpath(await asyncio.to_thread(process_cwd, pid))
                except NoSuchProcess:
                    raise ProtocolError(CONFLICT, f"process {p.pid} has exited") from None
            await self._may(peer, cwd, os.W_OK, "you may lock only a directory you can write (or attach with lock=false)")
        session = await self.engine.attach(
            pid, cwd=cwd, labels=p.labels, policy=p.policy, timeout_s=p.timeout_s, kill_on_timeout=p.kill_on_timeout,
            lock=p.lock, force=p.force, owner_uid=peer.uid, orphans=p.orphans, **p.hooks())
        return session.public()

    async def launch(self, peer: Peer, p: LaunchParams) -> Any:
        """Run a command as a session, as the peer's own uid (root's daemon), or refused."""
        if self.launcher is None:
            raise ProtocolError(UNAVAILABLE, "this daemon does not launch")
        if not peer.root and os.geteuid() != 0 and peer.uid != os.geteuid():
            raise self._deny(peer, "this daemon runs as another user and can launch only as itself")
        await self._may(peer, p.cwd, os.X_OK, "you may launch only in a directory you can enter")
        if p.lock and not p.force:
            await self._may(peer, p.cwd, os.W_OK, "you may lock only a directory you can write (or launch with lock=false)")
        session = await self.launcher.launch(
            p.argv, cwd=p.cwd, env=p.env, uid=peer.uid, gid=peer.gid, labels=p.labels,
            policy="tree" if p.tree else "root", timeout_s=p.timeout_s, kill_on_timeout=p.kill_on_timeout,
            lock=p.lock, force=p.force, log=p.log, orphans=p.orphans, **p.hooks())
        return session.public()

    async def list_sessions(self, peer: Peer, p: ListParams) -> Any:
        return [s.public() for s in sorted(self.engine.sessions(include_stopped=p.all), key=lambda s: s.started_at)]

    async def get(self, peer: Peer, p: SessionParams) -> Any:
        return self.engine.session(p.id).public()

    async def stop(self, peer: Peer, p: StopParams) -> Any:
        session = self.engine.session(p.id)
        self._own(peer, session.owner_uid, f"session {session.id}")
        await self.engine.stop(session.id, p.signum, p.grace_s)
        if p.wait:  # report the death it saw, within the grace (and the KILL after it)
            await self._stopped(session, p.grace_s + 5.0)
        return session.public()

    async def _stopped(self, session: Session, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while session.state == "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def children(self, peer: Peer, p: SessionParams) -> Any:
        session = self.engine.session(p.id)
        return {"children": [c.to_dict() for c in (*session.recent, *session.children.values())],
                "summary": session.child_summary(),
                "blocking": [c.to_dict() for c in self.engine.blocking_children(session.id)]}

    async def orphans(self, peer: Peer, p: OrphansParams) -> Any:
        """The live orphans of stopped sessions (of one, with `id`), each with its session."""
        sessions = [self.engine.session(p.id)] if p.id is not None else self.engine.orphaned()
        return [{**orphan, "session_id": s.id, "cwd": s.cwd, "orphans_policy": s.orphans_policy}
                for s in sessions for orphan in s.live_orphans()]

    async def lock(self, peer: Peer, p: LockParams) -> Any:
        await self._may(peer, p.directory, os.W_OK, "you may lock only a directory you can write")
        lock = await self.engine.lock(p.directory, by=p.by, reason=p.reason, owner_uid=peer.uid)
        return lock.public()

    async def unlock(self, peer: Peer, p: DirectoryParams) -> Any:
        lock = self.engine.locks.locks.get(p.directory)
        if lock is None:
            raise NotLocked(p.directory)
        self._own(peer, lock.owner_uid, f"the lock on {p.directory}")
        await self.engine.unlock(p.directory)
        return lock.public()

    async def locks(self, peer: Peer, p: NoParams) -> Any:
        return [lock.public() for lock in sorted(self.engine.locks.locks.values(), key=lambda lk: lk.directory)]

    async def who(self, peer: Peer, p: DirectoryParams) -> Any:
        found = await self.engine.who_uses(p.directory)
        return [found_ for found_ in found if not monitors_own(found_["pid"], peer.pid)]

    async def fuse_set(self, peer: Peer, p: FuseSetParams) -> Any:
        existing = self.engine.fuses.fuses.get(p.directory)
        if existing is not None:
            self._own(peer, existing.owner_uid, f"the fuse on {p.directory}")
        await self._may(peer, p.directory, os.W_OK, "you may set a fuse only on a directory you can write")
        fuse = await self.engine.fuse_set(p.directory, p.ttl_s, p.action, owner_uid=peer.uid)
        return fuse.to_dict()

    async def fuse_extend(self, peer: Peer, p: FuseExtendParams) -> Any:
        self._own(peer, self.engine.fuses.get(p.directory).owner_uid, f"the fuse on {p.directory}")
        return (await self.engine.fuse_extend(p.directory, p.by_s)).to_dict()

    async def fuse_cancel(self, peer: Peer, p: DirectoryParams) -> Any:
        self._own(peer, self.engine.fuses.get(p.directory).owner_uid, f"the fuse on {p.directory}")
        return (await self.engine.fuse_cancel(p.directory)).to_dict()

    async def fuses(self, peer: Peer, p: NoParams) -> Any:
        return [f.to_dict() for f in sorted(self.engine.fuses.fuses.values(), key=lambda f: f.directory)]

    async def render_metrics(self, peer: Peer, p: NoParams) -> Any:
        """The Prometheus text exposition, as of now."""
        if self.metrics is None:
            raise ProtocolError(UNAVAILABLE, "this daemon keeps no metrics")
        self.metrics.refresh()
        return self.metrics.render()

    def _webhooks(self) -> Webhooks:
        if self.webhooks is None:
            raise ProtocolError(UNAVAILABLE, "this daemon sends no webhooks")
        return self.webhooks

    async def webhook_list(self, peer: Peer, p: WebhookListParams) -> Any:
        """Endpoints (never their secrets) and the latest deliveries, or only the failed ones."""
        webhooks = self._webhooks()
        return {"endpoints": webhooks.status(), "deliveries": await webhooks.deliveries(failed_only=p.failed, limit=p.limit)}

    def _administrator(self, peer: Peer, what: str) -> None:
        """Webhooks are the config's, so their administration is root's (or the daemon user's)."""
        if not peer.root and peer.uid != os.geteuid():
            raise self._deny(peer, f"{what} is for root")

    async def webhook_retry(self, peer: Peer, p: WebhookRetryParams) -> Any:
        self._administrator(peer, "retrying a webhook delivery")
        return await self._webhooks().retry(p.id)

    async def webhook_enable(self, peer: Peer, p: WebhookEnableParams) -> Any:
        self._administrator(peer, "enabling a webhook endpoint")
        return self._webhooks().enable(p.name)


class Server:
    """asyncio Unix-socket server: one task per connection, bounded in number (fairly, per uid)
    and in the time a request line may take to arrive."""

    def __init__(self, api: Api, path: Path, *, max_connections: int = 256, idle_timeout_s: float = 600.0,
                 subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER) -> None:
        self.api = api
        self.path = path
        self.slots = Slots(max_connections)
        self.line_timeout_s = idle_timeout_s  # the config's name for it: see _requests
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
        ensure_open_files(self.slots.total + FD_HEADROOM, "max_connections")
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
            await cancel_all(pending)
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
        peer: Peer | None = None
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            refusal = self.slots.take(peer.uid)
            if refusal is not None:
                peer = None  # holds no slot
                writer.write(error(None, UNAVAILABLE, refusal))
                await writer.drain()
                return
            await self._requests(peer, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as err:  # a bug: this connection ends, the daemon and the others go on
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(error(None, INTERNAL, internal("a connection", err)))
        finally:
            if peer is not None:
                self.slots.give_back(peer.uid)
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _requests(self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                # A deadline per request line, from the end of the last answer: a client that
                # sends nothing, or a byte now and then, is closed when it passes (whatever
                # it sent). Not reset by traffic, so trickling cannot hold a slot for longer.
                async with asyncio.timeout(self.line_timeout_s):  # no task per request, unlike wait_for
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
                answer = error(request.id, INTERNAL, internal(request.method, err))
            writer.write(answer)
            await writer.drain()

    async def _stream(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """events.subscribe: committed events (of some types, of one session) from `since`, then live.

        Registered before the backlog is read, so nothing committed in between is missed;
        what both the backlog and the live feed carry goes out once (by id)."""
        try:
            params = decode_params(request.method, request.params)
            assert isinstance(params, SubscribeParams)
            session = params.session
            if session is not None:  # a session nobody knows would be waited on for ever
                try:
                    session = self.api.engine.session(session).id
                except UnknownSession as err:
                    raise ProtocolError(NOT_FOUND, str(err)) from None
        except ProtocolError as err:
            writer.write(error(request.id, err.code, err.message))
            await writer.drain()
            return
        since = params.since
        subscriber = Subscriber(writer, request.id, params.types, session, self.subscriber_buffer)
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
            subscriber.sent = since if since is not None else last
            while backlog:
                for record in backlog:
                    if subscriber.wants(record):
                        await subscriber.send(record)
                subscriber.sent = backlog[-1].seq or subscriber.sent
                backlog = await self.api.engine.records(subscriber.sent, 1000) if subscriber.sent < last else []
            subscriber.live = True
            while (live := await subscriber.next()) is not None:
                await subscriber.send(live)
        except StorageError as err:  # a damaged page of the event log: say so, and end this stream only
            log.error("events.subscribe: cannot read the event log: %s", err)
            writer.write(error(request.id, STORAGE, str(err)))
            await writer.drain()
        finally:
            self._subscribers.discard(subscriber)


class Slots:
    """Connection slots, shared fairly between uids.

    Each uid other than root and the daemon's own may hold at most `per_uid` connections
    (a quarter of what is left after the reserve), and only while the general pool lasts;
    the last `reserve` slots (an eighth) go only to root, the daemon's uid, and a uid's
    first connection. So one user's flood of idle or trickling connections leaves room
    for root and for every other user to be served.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.reserve = min(max(1, total // 8), total - 1)
        self.per_uid = max(1, (total - self.reserve) // 4)
        self.held: collections.Counter[int] = collections.Counter()
        self.used = 0

    def take(self, uid: int) -> str | None:
        """Take a slot for a connection of `uid`: None, or why not."""
        if self.used >= self.total:
            return f"too many connections (at most {self.total})"
        privileged = uid == 0 or uid == os.geteuid()
        if not privileged and self.held[uid] > 0:
            if self.held[uid] >= self.per_uid:
                return f"too many connections from uid {uid} (at most {self.per_uid} each)"
            if self.used >= self.total - self.reserve:
                return f"too many connections (the last {self.reserve} are kept for root and for new users)"
        self.held[uid] += 1
        self.used += 1
        return None

    def give_back(self, uid: int) -> None:
        self.used -= 1
        self.held[uid] -= 1
        if not self.held[uid]:
            del self.held[uid]


class Subscriber:
    """One events.subscribe stream: its filter, and a bounded buffer of what it has not yet read."""

    def __init__(self, writer: asyncio.StreamWriter, request_id: Any, types: list[str] | None, session: str | None,
                 buffer: int) -> None:
        self.writer = writer
        self.request_id = request_id
        self.types = frozenset(types) if types is not None else None
        self.session = session
        self.queue: asyncio.Queue[Record | None] = asyncio.Queue(maxsize=buffer)
        self.sent = 0  # the id of the last event written (a replayed one is not written twice)
        self.live = False  # replay done: events are written as they are committed (see offer)

    def wants(self, record: Record) -> bool:
        if self.types is not None and record.type not in self.types:
            return False
        return self.session is None or str(record.payload.get("session_id") or "").startswith(self.session)

    def offer(self, record: Record) -> bool:
        """Take a committed event: False when this subscriber's buffer is full.

        A live subscriber that has nothing queued and nothing waiting in its socket's buffer
        gets the line at once, from here: no task switch on the way from the commit to the
        reader. Anything else queues, in order, for the stream task, which waits for the
        reader between lines (and learns of a connection gone, writing to it)."""
        transport = self.writer.transport
        if self.live and self.queue.empty() and not transport.get_write_buffer_size() and not transport.is_closing():
            self.write(record)
            return True
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            return False
        return True

    async def next(self) -> Record | None:
        return await self.queue.get()

    def write(self, record: Record) -> None:
        if record.seq is not None and record.seq > self.sent:
            self.writer.write(encode({"id": self.request_id, "event": record.public()}))
            self.sent = record.seq

    async def send(self, record: Record) -> None:
        self.write(record)
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


def ensure_open_files(needed: int, setting: str) -> None:
    """Lift the soft limit on open files to `needed` (up to the hard limit), or say which
    setting asks for more than the process may open: a daemon out of descriptors stops
    accepting anyone (asyncio backs off accept() on EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed or soft == resource.RLIM_INFINITY:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return
    raise MonitorError(f"{setting} needs {needed} open files, more than RLIMIT_NOFILE allows ({hard}): "
                       f"lower {setting} or raise the limit (LimitNOFILE= under systemd)")


def runtime_directory(directory: Path) -> None:
    """The socket's directory, made by the daemon itself: root's and 0755 for the system
    daemon (every user may reach the socket), the user's and 0700 for a user's. One that
    exists must already be ours and writable by no one else, and so must every directory
    above it (or be sticky): whoever could write there could swap in their own socket."""
    euid = os.geteuid()
    mode = 0o755 if euid == 0 else 0o700
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory, mode)
        os.chmod(directory, mode)  # exactly: the umask may have cut it
    except FileExistsError:
        pass
    check_directory(directory, frozenset({0, euid}), owner=euid)


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, safely.

    The directory is the daemon's own (runtime_directory). A symlink at the path is refused
    (it could point anywhere); a socket there is replaced only when no daemon answers on it;
    anything else there is refused. The socket is bound under a umask that leaves no moment
    with wider permissions than intended.
    """
    runtime_directory(path.parent)
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
    # Bound and listening under a name of its own first, then linked into place: a client
    # that finds the socket can connect at once (never "connection refused" from a socket
    # that is bound but not yet listening), and link(2), unlike rename, never replaces
    # another daemon's socket that appeared meanwhile.
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600, then opened up on purpose below
    try:
        sock.bind(str(staging))
        # Every user may connect; what each may do is decided per request from SO_PEERCRED.
        os.chmod(staging, 0o666 if os.geteuid() == 0 else 0o600)
        sock.listen(socket.SOMAXCONN)  # a burst of connects waits in the backlog, not refused
        os.link(staging, path)
    except OSError as err:
        sock.close()
        if err.errno in (errno.EADDRINUSE, errno.EEXIST):
            raise MonitorError(f"{path} is in use") from None
        raise
    finally:
        os.umask(old)
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
    sock.setblocking(False)
    return sock

"""Fleet state in JetStream key-value buckets: each daemon's running sessions, locks and
heartbeat (`FleetState`, in the daemon), and the fleet as any machine reads it (`Fleet`).

The daemon's memory is the truth; the buckets follow it. Every event that names a session
or a directory marks that key dirty, and the keeper puts (running, held) or deletes
(stopped, released) it soon after. On every new connection, and so at start-up, the host's
keys are rebuilt from memory: whatever the buckets hold for this host that memory does not
(left by a daemon that was down or cut off) is deleted, so no row is stale for long.

A heartbeat (version, counts, time) is put every `heartbeat_s`; a reader shows a host
whose heartbeat is older than 3 intervals as `unreachable`, with its last rows as they
were. Its age is read from the key-value entry's time, set by the server, so the hosts'
clocks do not matter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from monitor import __version__
from monitor.clock import Clock, SystemClock
from monitor.config import NatsConfig
from monitor.jetstream import HEARTBEAT_MISSES, Link, bucket, host_token, lock_key
from monitor.store import Record
from monitor.tasks import cancel

log = logging.getLogger(__name__)

SESSIONS, LOCKS, HOSTS = "sessions", "locks", "hosts"


async def open_bucket(js: JetStreamContext, name: str, *, create: bool) -> KeyValue | None:
    """The bucket, created (file storage, one value per key) when missing and `create`."""
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        if not create:
            return None
    return await js.create_key_value(api.KeyValueConfig(bucket=name, history=1, storage=api.StorageType.FILE,
                                                        description="monitor fleet state"))


@dataclass(frozen=True)
class Entry:
    """A live key of a bucket: its value, and when the server stored it (wall seconds)."""

    key: str
    value: bytes
    stored_at: float | None


async def entries(js: JetStreamContext, name: str, keys: str = ">") -> list[Entry]:
    """Every live entry of the bucket `name` whose key matches `keys`, as of now.

    Not through a KV watcher: nats-py's watcher can end its replay of what is there too
    early while keys are being written (nats-io/nats.py#842: its "done" marker comes from a
    per-message pending count that can touch 0 and rise again), and every host rewrites its
    heartbeat key every few seconds, so a listing could miss hosts, or a rebuild miss stale
    keys. Here the stream says in one answer which keys hold a message (a bucket is the
    stream KV_<bucket>, its keys the subjects $KV.<bucket>.<key>: ADR-8), and each key's
    last message is read; a delete or purge marker is no entry.
    """
    stream, prefix = f"KV_{name}", f"$KV.{name}."
    info = await js.stream_info(stream, subjects_filter=prefix + keys)
    found: list[Entry] = []
    for subject in sorted(info.state.subjects or {}):
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            continue  # gone since the stream answered
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            continue
        found.append(Entry(subject[len(prefix):], msg.data or b"", msg.time.timestamp() if msg.time else None))
    return found


class FleetState:
    """This daemon's rows in the fleet buckets, kept equal to its memory."""

    def __init__(self, config: NatsConfig, engine: Any, link: Link, *, clock: Clock | None = None,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.config = config
        self.engine = engine  # read only: tracker.sessions, sessions(), locks.locks, source
        self.link = link
        self.clock: Clock = clock or SystemClock()
        self.extra = extra  # more heartbeat fields (the sink's pending events)
        self.token = host_token(config.host)
        self.started_at = self.clock.wall()
        self.dirty_sessions: set[str] = set()
        self.dirty_locks: set[str] = set()
        self.present_sessions: set[str] = set()  # ids whose key we put (and did not delete)
        self.present_locks: set[str] = set()  # directories likewise
        self.buckets: dict[str, KeyValue] = {}
        self.js: JetStreamContext | None = None  # the connection the buckets were opened on
        self.rebuilt_epoch = 0
        self.heartbeats = 0
        self.wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        link.setups.append(self._open_buckets)

    async def _open_buckets(self, js: JetStreamContext) -> None:
        self.js = js
        for what in (SESSIONS, LOCKS, HOSTS):
            kv = await open_bucket(js, bucket(self.config.stream, what), create=True)
            assert kv is not None
            self.buckets[what] = kv

    def offer(self, record: Record) -> None:
        """A committed event: the keys it names are put or deleted soon."""
        payload = record.payload
        if record.type.startswith("lock."):
            if payload.get("directory"):
                self.dirty_locks.add(str(payload["directory"]))
        if payload.get("session_id"):
            self.dirty_sessions.add(str(payload["session_id"]))
        self.wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nats-fleet")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None

    def _session_key(self, session_id: str) -> str:
        return f"{self.token}.{session_id}"

    def heartbeat(self) -> dict[str, Any]:
        source = self.engine.source
        return {"host": self.config.host, "version": __version__, "at": self.clock.wall(), "heartbeat_s": self.config.heartbeat_s,
                "started_at": self.started_at, "source": source.name if source else None,
                "sessions_running": len(self.engine.sessions()), "locks": len(self.engine.locks.locks), **(self.extra() if self.extra else {})}

    async def _run(self) -> None:
        next_beat = 0.0
        while True:
            _js, epoch = await self.link.jetstream()
            try:
                if epoch != self.rebuilt_epoch:
                    await self._rebuild()
                    self.rebuilt_epoch = epoch
                else:
                    await self._flush()
                if self.clock.monotonic() >= next_beat:
                    await self.buckets[HOSTS].put(self.token, json.dumps(self.heartbeat()).encode())
                    self.heartbeats += 1
                    next_beat = self.clock.monotonic() + self.config.heartbeat_s
            except Exception as err:  # a new connection rebuilds everything
                self.link.failed(err, epoch)
                continue
            if self.dirty_sessions or self.dirty_locks:
                continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.0, next_beat - self.clock.monotonic()))

    async def _rebuild(self) -> None:
        """Make this host's keys what memory holds: put every running session and lock, delete
        every other key of this host."""
        self.dirty_sessions.clear()
        self.dirty_locks.clear()
        sessions, locks = self.buckets[SESSIONS], self.buckets[LOCKS]
        sessions_bucket, locks_bucket = bucket(self.config.stream, SESSIONS), bucket(self.config.stream, LOCKS)
        running = {s.id: s for s in self.engine.sessions()}
        held = dict(self.engine.locks.locks)
        assert self.js is not None  # set with the buckets
        stale_sessions = {e.key for e in await entries(self.js, sessions_bucket, f"{self.token}.>")}
        stale_locks = {e.key for e in await entries(self.js, locks_bucket, f"{self.token}.>")}
        self.present_sessions.clear()
        self.present_locks.clear()
        for session_id, session in running.items():
            key = self._session_key(session_id)
            await sessions.put(key, json.dumps(session.public()).encode())
            self.present_sessions.add(session_id)
            stale_sessions.discard(key)
        for directory, lock in held.items():
            key = lock_key(self.config.host, directory)
            await locks.put(key, json.dumps(lock.public()).encode())
            self.present_locks.add(directory)
            stale_locks.discard(key)
        for key in stale_sessions:
            await sessions.delete(key)
        for key in stale_locks:
            await locks.delete(key)
        if stale_sessions or stale_locks:
            log.info("fleet: removed %d session and %d lock rows this host no longer has", len(stale_sessions), len(stale_locks))

    async def _flush(self) -> None:
        sessions, locks = self.buckets[SESSIONS], self.buckets[LOCKS]
        while self.dirty_sessions:
            session_id = self.dirty_sessions.pop()
            session = self.engine.tracker.sessions.get(session_id)
            try:
                if session is not None and session.state == "running":
                    await sessions.put(self._session_key(session_id), json.dumps(session.public()).encode())
                    self.present_sessions.add(session_id)
                elif session_id in self.present_sessions:
                    await sessions.delete(self._session_key(session_id))
                    self.present_sessions.discard(session_id)
            except BaseException:
                self.dirty_sessions.add(session_id)
                raise
        while self.dirty_locks:
            directory = self.dirty_locks.pop()
            lock = self.engine.locks.locks.get(directory)
            try:
                if lock is not None:
                    await locks.put(lock_key(self.config.host, directory), json.dumps(lock.public()).encode())
                    self.present_locks.add(directory)
                elif directory in self.present_locks:
                    await locks.delete(lock_key(self.config.host, directory))
                    self.present_locks.discard(directory)
            except BaseException:
                self.dirty_locks.add(directory)
                raise


# -- reading the fleet, from any machine -------------------------------------------------------


class Fleet:
    """The fleet as the buckets and the stream show it."""

    def __init__(self, js: JetStreamContext, config: NatsConfig, *, now: Callable[[], float] = time.time) -> None:
        self.js = js
        self.config = config
        self.now = now

    async def _entries(self, what: str, keys: str = ">") -> list[Entry]:
        name = bucket(self.config.stream, what)
        kv = await open_bucket(self.js, name, create=False)
        return [] if kv is None else await entries(self.js, name, keys)

    async def hosts(self) -> list[dict[str, Any]]:
        """Every host that ever put a heartbeat, with `status` up or unreachable, by name."""
        found = []
        now = self.now()
        for entry in await self._entries(HOSTS):
            beat = json.loads(entry.value or b"{}")
            seen = entry.stored_at or float(beat.get("at") or 0.0)
            age = max(0.0, now - seen)
            interval = float(beat.get("heartbeat_s") or self.config.heartbeat_s)
            found.append({**beat, "token": entry.key, "last_seen": seen, "age_s": round(age, 3),
                          "status": "up" if age <= HEARTBEAT_MISSES * interval else "unreachable"})
        return sorted(found, key=lambda h: str(h.get("host")))

    async def sessions(self, host: str | None = None) -> list[dict[str, Any]]:
        """Running sessions, each with its `host` and that host's `host_status`."""
        hosts = {h["token"]: h for h in await self.hosts()}
        keys = f"{host_token(host)}.>" if host else ">"
        found = []
        for entry in await self._entries(SESSIONS, keys):
            token, _, _session_id = entry.key.partition(".")
            beat = hosts.get(token, {})
            session = json.loads(entry.value or b"{}")
            found.append({"host": beat.get("host", token), "host_status": beat.get("status", "unknown"), **session})
        return sorted(found, key=lambda s: (str(s["host"]), s.get("started_at") or 0.0))

    async def locks(self, host: str | None = None) -> list[dict[str, Any]]:
        hosts = {h["token"]: h for h in await self.hosts()}
        keys = f"{host_token(host)}.>" if host else ">"
        found = []
        for entry in await self._entries(LOCKS, keys):
            token, _, encoded = entry.key.partition(".")
            beat = hosts.get(token, {})
            lock = json.loads(entry.value or b"{}")
            lock.setdefault("directory", base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode(errors="replace"))
            found.append({"host": beat.get("host", token), "host_status": beat.get("status", "unknown"), **lock})
        return sorted(found, key=lambda lk: (str(lk["host"]), str(lk["directory"])))

    async def events(self, *, host: str | None = None, types: list[str] | None = None, since: float | None = None,
                     follow: bool = False, batch: int = 256) -> AsyncIterator[dict[str, Any]]:
        """Events from the stream in its order: from `since` (wall; None: from the first kept),
        then, with `follow`, as they come."""
        token = host_token(host) if host else "*"
        filters = [f"{self.config.subject_prefix}.{token}.{t}" for t in types] if types else [f"{self.config.subject_prefix}.{token}.>"]
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, filter_subjects=filters, inactive_threshold=60.0,
                                    deliver_policy=api.DeliverPolicy.ALL if since is None else api.DeliverPolicy.BY_START_TIME,
                                    opt_start_time=None if since is None else datetime.datetime.fromtimestamp(since, datetime.UTC))
        sub = await self.js.pull_subscribe("", durable=None, stream=self.config.stream, config=config)
        try:
            info = await sub.consumer_info()
            if not follow and not info.num_pending:
                return
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=1.0)
                except TimeoutError:  # nothing new within the second
                    msgs = []
                for msg in msgs:
                    yield json.loads(msg.data)
                    if not follow and msg.metadata.num_pending == 0:
                        return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

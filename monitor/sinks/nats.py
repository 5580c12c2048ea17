"""The NATS sink: the event log published to JetStream, at least once and in order.

    outbox -> Feed -> ready (in order) -> js.publish(<prefix>.<host>.<type>, body, Nats-Msg-Id: msg_id)
           -> PubAck -> cursor (sink_cursors, written in batches)

One event at a time, each PubAck awaited before the next is sent, on one connection: so
the stream holds this host's events in the log's order, and an event is never stored
after a later one. A PubAck flagged `duplicate` counts as delivered (the stream already
had it: a resend after a lost ack, or after a kill -9 before the cursor was written).
While NATS cannot be reached nothing is lost: the log holds the events, the link retries
with backoff and jitter, and `pending` and `lag_s` grow.

The body is the event exactly as `events.subscribe` streams it, plus `host`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Any

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from monitor.clock import Clock, SystemClock
from monitor.config import NatsConfig
from monitor.errors import MonitorError
from monitor.jetstream import Link, subject
from monitor.sinks.base import MAX_READY, READ_BATCH, Feed, Saver, StoreThread
from monitor.store import CursorStore, Record
from monitor.tasks import cancel

log = logging.getLogger(__name__)

SINK_NAME = "nats"  # its row in sink_cursors
CURSOR_SAVE_S = 0.05  # the cursor is written at most this often: a kill -9 resends at most this much (same ids)


class StreamMismatch(MonitorError):
    """The stream exists but does not take our subjects."""


def body(record: Record, host: str) -> bytes:
    """What is published: the subscriber's view of the event, plus the host it happened on."""
    return json.dumps({**record.public(), "host": host}, separators=(",", ":")).encode()


async def ensure_stream(js: JetStreamContext, config: NatsConfig) -> None:
    """Use the stream if it is there (and takes `<prefix>.>`); create it if not."""
    wanted = f"{config.subject_prefix}.>"
    try:
        info = await js.stream_info(config.stream)
    except NotFoundError:
        await js.add_stream(api.StreamConfig(
            name=config.stream, subjects=[wanted], storage=api.StorageType.FILE, retention=api.RetentionPolicy.LIMITS,
            duplicate_window=config.duplicate_window_s, max_age=config.max_age_s or None, max_bytes=config.max_bytes,
            description="monitor: every host's lifecycle events"))
        log.info("nats: created stream %s for %s", config.stream, wanted)
        return
    subjects = info.config.subjects or []
    if wanted not in subjects and ">" not in subjects:
        raise StreamMismatch(f"stream {config.stream} exists but takes {subjects}, not {wanted}: "
                             "choose another stream or subject_prefix")


class NatsSink:
    """The event log to JetStream. `offer` is the engine's record listener."""

    def __init__(self, config: NatsConfig, state_path: Any, link: Link, *, clock: Clock | None = None) -> None:
        self.config = config
        self.state_path = state_path
        self.link = link
        self.clock: Clock = clock or SystemClock()
        self.ready: deque[Record] = deque()
        self.feed = Feed(self.wants, self.ready.append, self._read, self._last_seq, lambda: len(self.ready) < MAX_READY)
        self.published = 0
        self.duplicates = 0
        self.saved: int | None = None  # the cursor as last written
        self.thread = StoreThread("nats")
        self.saver = Saver(self._save, CURSOR_SAVE_S)
        self._db: CursorStore | None = None
        self._task: asyncio.Task[None] | None = None
        link.setups.append(lambda js: ensure_stream(js, config))

    def wants(self, record: Record) -> bool:
        return self.config.events is None or record.type in self.config.events

    @property
    def cursor(self) -> int | None:
        if self.feed.seen is None:
            return None
        return (self.ready[0].seq or 1) - 1 if self.ready else self.feed.seen

    @property
    def pending(self) -> int:
        """Events in the log after the cursor (each one published or skipped next)."""
        cursor = self.cursor
        return 0 if cursor is None else max(0, self.feed.newest - cursor)

    def lag_s(self) -> float:
        """How old the oldest event waiting to be published is (0: none waits)."""
        return max(0.0, self.clock.wall() - self.ready[0].created_at) if self.ready else 0.0

    def offer(self, record: Record) -> None:
        self.feed.offer(record)

    async def start(self) -> None:
        """Load the cursor; a sink seen for the first time starts at the end of the log (the
        past is not published, as for a new webhook endpoint)."""
        self._db = await self.thread.run(CursorStore, self.state_path)
        cursor = await self.thread.run(self._db.cursor, SINK_NAME)
        if cursor is None:
            cursor = await self.thread.run(self._db.last_seq)
            await self.thread.run(self._db.set_cursor, SINK_NAME, cursor, self.clock.wall())
        self.feed.seen = self.saved = cursor
        self.feed.newest = max(self.feed.newest, cursor)
        self.feed.catch_up = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nats-sink")

    async def close(self) -> None:
        """Stop publishing and write the cursor; what was in flight goes again (same id)."""
        await cancel(self._task)
        self._task = None
        if self._db is not None:
            await self.saver.flush()
            await self.thread.run(self._db.close)
            self._db = None
        self.thread.close()

    def status(self) -> dict[str, Any]:
        return {**self.config.public(), "connected": self.link.connected, "cursor": self.cursor, "pending": self.pending,
                "published": self.published, "failures": self.link.failures, "lag_s": round(self.lag_s(), 3),
                "last_error": self.link.last_error}

    async def _read(self, since: int) -> list[Record]:
        assert self._db is not None
        return await self.thread.run(self._db.records, since, self.config.events, READ_BATCH)

    async def _last_seq(self) -> int:
        assert self._db is not None
        return await self.thread.run(self._db.last_seq)

    async def _run(self) -> None:
        feed = self.feed
        host = self.config.host
        while True:
            feed.wake.clear()
            if feed.catch_up and len(self.ready) < MAX_READY:
                await feed.read_back()
            if not self.ready:
                self.saver.kick()  # the cursor moves past what was not wanted too
                if not feed.catch_up:
                    await feed.wake.wait()
                continue
            js, epoch = await self.link.jetstream()
            record = self.ready[0]
            try:
                ack = await js.publish(subject(self.config.subject_prefix, host, record.type), body(record, host),
                                       timeout=self.config.timeout_s, stream=self.config.stream,
                                       headers={"Nats-Msg-Id": record.id})
            except Exception as err:  # no ack: the same event again, after the link's backoff
                self.link.failed(err, epoch)
                continue
            self.ready.popleft()
            self.published += 1
            self.duplicates += bool(ack.duplicate)
            self.saver.kick()

    async def _save(self) -> bool:
        cursor = self.cursor
        if cursor is None or self._db is None or (self.saved is not None and cursor <= self.saved):
            return False
        try:
            await self.thread.run(self._db.set_cursor, SINK_NAME, cursor, self.clock.wall())
        except Exception as err:  # the next save carries it; a restart resends what was lost (same ids)
            log.error("nats: could not record the publishing cursor: %s", err)
            return False
        self.saved = cursor
        return True

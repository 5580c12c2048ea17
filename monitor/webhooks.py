"""Webhooks: the event log delivered to HTTP endpoints, signed, at least once, with a stable id.

    outbox (committed with its transition) -> each endpoint's queue -> POST -> outcome
    -> DeliveryStore (delivered / pending with its next attempt / failed)

Each endpoint has a cursor in the log: every event at or below it is delivered, or
stored as pending or failed, or not of a type the endpoint wants. Live events reach
its queue straight from the engine (no read of the store on the way); anything the
live feed did not carry (a start, a gap) is read back from the store: the feed and the
backoff are the sinks' shared machinery (`monitor.sinks.base`). An event is
sent with the same `webhook-id` on every attempt and after any restart, so a
receiver deduplicates; a kill -9 between the send and its record means one more
delivery, never none.

What is sent, body and signature, is the endpoint's format's (monitor.webhook_format):
Standard Webhooks by default, or exactly agentctl's, for receivers written for it.

Retries: 4x backoff from `retry_first_s` with +-20% jitter, capped at `retry_max_s`,
until the event is `max_age_s` old; `Retry-After` pushes the next attempt later;
410 Gone disables the endpoint (until `monitor webhooks --enable`); redirects are
failures (never followed); every attempt is bounded by `timeout_s`; each endpoint
has its own connections and tasks, so a slow one never starves another.

Destinations: the name is resolved once per connection and every address is
checked before connecting to exactly the checked one (no DNS rebinding window):
loopback, private, link-local (cloud metadata) and other non-global addresses are
refused unless the endpoint sets `allow_private`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpcore

from monitor import __version__, webhook_format
from monitor.clock import Clock, SystemClock
from monitor.config import Endpoint, ip_literal, non_public_kind
from monitor.errors import MonitorError
from monitor.sinks.base import MAX_READY, Backoff, Feed, StoreThread
from monitor.store import Delivery, DeliveryStore, Record
from monitor.tasks import cancel_all

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_FACTOR = 4.0
JITTER = 0.2
ERROR_TEXT_BYTES = 300  # of a failed answer's body, kept with the delivery
DRAIN_BYTES = 64 * 1024  # read of an answer at most; a longer one costs the connection


class Observer(Protocol):
    """What delivery reports as it goes (`monitor.metrics.Metrics` is one)."""

    def webhook_attempt(self, endpoint: str, outcome: str, seconds: float) -> None: ...
    def webhook_latency(self, endpoint: str, seconds: float) -> None: ...
    def webhook_gave_up(self, endpoint: str) -> None: ...


class RefusedDestination(MonitorError):
    """The endpoint resolves to an address it may not be sent to."""


class UnknownDelivery(MonitorError):
    pass


# -- what is sent: pure ------------------------------------------------------------------


def retry_after_s(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def next_attempt(endpoint: Endpoint, attempts: int, created_at: float, now: float, retry_after: float | None,
                 rng: Callable[[], float] | None = None) -> float | None:
    """When to try again after `attempts` failed ones (wall time), or None: give up."""
    backoff = Backoff(endpoint.retry_first_s, endpoint.retry_max_s, BACKOFF_FACTOR, JITTER)
    delay = backoff.delay(attempts) if rng is None else backoff.delay(attempts, rng)
    if retry_after is not None:
        delay = max(delay, retry_after)
    at = now + delay
    return at if at <= created_at + endpoint.max_age_s else None


def check_destination(address: str, allow_private: bool) -> None:
    ip = ip_literal(address)
    if ip is None:
        raise RefusedDestination(f"{address!r} is not an address")
    if not allow_private and (kind := non_public_kind(ip)):
        raise RefusedDestination(f"{ip} is {kind}; set allow_private = true on the endpoint to send there")


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses that pass `check_destination`,
    and to exactly the addresses it checked."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        addresses = [host] if ip_literal(host) is not None else await _resolve(host, port, timeout)
        for address in addresses:  # all of them: a name must not hide a private address among public ones
            check_destination(address, self.allow_private)
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                failure = err
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise RefusedDestination("webhooks are not sent to Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def _resolve(host: str, port: int, timeout: float | None) -> list[str]:
    try:
        async with asyncio.timeout(timeout):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as err:
        raise httpcore.ConnectError(f"cannot resolve {host}: {err}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True, slots=True)
class Answer:
    """One attempt's result: an HTTP status, or why there was none."""

    status: int | None
    seconds: float
    error: str | None = None
    retry_after: float | None = None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


async def post(pool: httpcore.AsyncConnectionPool, endpoint: Endpoint, record: Record, now: float) -> Answer:
    """One signed POST of `record`, bounded by the endpoint's timeout in all."""
    assert record.seq is not None
    body = webhook_format.body(endpoint.format, record)
    headers = [("Content-Type", "application/json"), ("User-Agent", f"monitor/{__version__}"),
               *webhook_format.headers(endpoint.format, endpoint.secrets, record.id, int(now), body)]
    t = endpoint.timeout_s
    started = time.perf_counter()
    try:
        async with asyncio.timeout(t):
            async with pool.stream("POST", endpoint.url, headers=headers, content=body,
                                   extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}}) as response:
                text = b""
                async for chunk in response.aiter_stream():
                    text += chunk
                    if len(text) > DRAIN_BYTES:
                        break
    except RefusedDestination as err:
        return Answer(None, time.perf_counter() - started, str(err), refused=True)
    except TimeoutError:
        return Answer(None, time.perf_counter() - started, f"no answer within {t:g}s")
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
            OSError, ssl.SSLError) as err:
        return Answer(None, time.perf_counter() - started, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
    except Exception as err:  # a bug, not the receiver's fault: recorded and retried like any failure
        log.exception("webhook %s: sending event %s failed unexpectedly", endpoint.name, record.seq)
        return Answer(None, time.perf_counter() - started, f"{type(err).__name__}: {err}")
    seconds = time.perf_counter() - started
    status = response.status
    if 200 <= status < 300:
        return Answer(status, seconds)
    answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
    error: str | None
    if 300 <= status < 400:
        error = f"redirect to {answer_headers.get('location', '?')} (not followed)"
    else:
        error = text[:ERROR_TEXT_BYTES].decode(errors="replace").strip() or None
    return Answer(status, seconds, error, retry_after_s(answer_headers.get("retry-after"), now))


# -- delivery ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Due:
    record: Record
    attempts: int  # failed ones so far
    manual: bool = False  # a retry asked for by hand: one attempt, whatever the age


class EndpointWorker:
    """One endpoint's queue, retries and cursor; its own connections and tasks."""

    def __init__(self, endpoint: Endpoint, owner: Webhooks) -> None:
        self.endpoint = endpoint
        self.owner = owner
        self.pool = httpcore.AsyncConnectionPool(max_connections=endpoint.max_in_flight, retries=0,
                                                 network_backend=GuardedBackend(endpoint.allow_private))
        self.unsettled: set[int] = set()  # queued or in flight, not yet stored
        self.ready: deque[_Due] = deque()
        self.retries: list[tuple[float, int]] = []  # (next attempt, seq): a heap
        self.attempts: dict[int, int] = {}  # seq -> failed attempts, of the pending ones
        self.disabled: tuple[float, str] | None = None
        self.in_flight: set[asyncio.Task[None]] = set()
        # The log after the cursor: live from the engine, read back from the store after a gap.
        self.feed = Feed(self.wants, self._admit, self._undelivered, self._last_seq, lambda: len(self.ready) < MAX_READY)
        self.wake = self.feed.wake

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def seen(self) -> int | None:
        """Every event up to here is queued, stored or unwanted (None: not loaded)."""
        return self.feed.seen

    @seen.setter
    def seen(self, value: int | None) -> None:
        self.feed.seen = value

    @property
    def catch_up(self) -> bool:
        """The store must be read: at start, and after a gap in the live feed."""
        return self.feed.catch_up

    @catch_up.setter
    def catch_up(self, value: bool) -> None:
        self.feed.catch_up = value

    @property
    def cursor(self) -> int | None:
        if self.seen is None:
            return None
        return min(self.unsettled) - 1 if self.unsettled else self.seen

    @property
    def pending(self) -> int:
        return len(self.unsettled) + len(self.attempts)

    def wants(self, record: Record) -> bool:
        wanted = self.endpoint.wanted
        return wanted is None or record.type in wanted

    def offer(self, record: Record) -> None:
        """A committed event, live: queued at once if it is the next one, else read back."""
        self.feed.offer(record)

    def _admit(self, record: Record) -> None:
        assert record.seq is not None
        if record.seq not in self.unsettled and record.seq not in self.attempts:  # a read back may meet one we hold
            self.unsettled.add(record.seq)
            self.ready.append(_Due(record, 0))

    async def _undelivered(self, since: int) -> list[Record]:
        return await self.owner.db(self.owner.store.undelivered, self.name, since, self.endpoint.wanted)

    async def _last_seq(self) -> int:
        return await self.owner.db(self.owner.store.last_seq)

    async def run(self) -> None:
        while True:
            self.wake.clear()
            if self.catch_up and len(self.ready) < MAX_READY:
                await self.feed.read_back()
            delay = None
            if self.disabled is None:
                now = self.owner.clock.wall()
                while self.retries and self.retries[0][0] <= now and len(self.in_flight) < self.endpoint.max_in_flight:
                    _at, seq = heapq.heappop(self.retries)
                    if seq in self.attempts:
                        await self._load_retry(seq)
                while self.ready and len(self.in_flight) < self.endpoint.max_in_flight:
                    task = asyncio.get_running_loop().create_task(self._attempt(self.ready.popleft()))
                    self.in_flight.add(task)
                    task.add_done_callback(self._finished)
                if self.retries and len(self.in_flight) < self.endpoint.max_in_flight:
                    delay = max(0.0, self.retries[0][0] - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)

    def _finished(self, task: asyncio.Task[None]) -> None:
        """A slot is free only once the task is done: waking the loop before would find it
        still counted, start nothing, and sleep with work ready (a lost wake-up)."""
        self.in_flight.discard(task)
        self.wake.set()

    async def _load_retry(self, seq: int) -> None:
        record = await self.owner.db(self.owner.store.record, seq)
        attempts = self.attempts.pop(seq)
        if record is None:  # pruned: older than the events are kept
            self.owner.save(Delivery(self.name, seq, "failed", attempts, None, None, "the event is no longer kept",
                                     self.owner.clock.wall()), self)
            return
        self.unsettled.add(seq)
        self.ready.append(_Due(record, attempts))

    async def _attempt(self, due: _Due) -> None:
        record = due.record
        assert record.seq is not None
        clock = self.owner.clock
        answer = await post(self.pool, self.endpoint, record, clock.wall())
        now = clock.wall()
        attempts = due.attempts + 1
        observer = self.owner.observer
        state, next_at = "delivered", None
        if answer.delivered:
            outcome = "delivered"
            if observer is not None:
                observer.webhook_latency(self.name, max(0.0, now - record.created_at))
        elif answer.status == 410:
            outcome, state, next_at = "disabled", "pending", now  # sent again if it is enabled again
            self.disabled = (now, f"410 Gone from {self.endpoint.url}")
            log.error("webhook %s answered 410 Gone: disabled until `monitor webhooks --enable %s`", self.name, self.name)
        else:
            outcome = "refused" if answer.refused else "failed"
            if not answer.refused and not due.manual:
                next_at = next_attempt(self.endpoint, attempts, record.created_at, now, answer.retry_after)
            state = "pending" if next_at is not None else "failed"
            log.warning("webhook %s, event %d (attempt %d): %s", self.name, record.seq, attempts,
                        ": ".join(filter(None, [f"HTTP {answer.status}" if answer.status else None, answer.error])))
            if state == "failed":
                log.error("webhook %s gave up on event %d after %d attempts", self.name, record.seq, attempts)
                if observer is not None:
                    observer.webhook_gave_up(self.name)
        if observer is not None:
            observer.webhook_attempt(self.name, outcome, answer.seconds)
        self.unsettled.discard(record.seq)
        if state == "pending" and next_at is not None:
            self.attempts[record.seq] = attempts
            if outcome != "disabled":
                heapq.heappush(self.retries, (next_at, record.seq))
        self.owner.save(Delivery(self.name, record.seq, state, attempts, next_at, answer.status, answer.error, now), self)

    def enable(self) -> None:
        self.disabled = None
        now = self.owner.clock.wall()
        for seq in self.attempts:
            heapq.heappush(self.retries, (now, seq))
        self.wake.set()


SAVE_RETRY_FIRST_S = 0.5  # a failed save of delivery outcomes is tried again after this, doubling
SAVE_RETRY_MAX_S = 30.0


class Webhooks:
    """Every configured endpoint's delivery. `offer` is the engine's record listener."""

    def __init__(self, endpoints: Iterable[Endpoint], state_path: str | Path, *, clock: Clock | None = None,
                 observer: Observer | None = None) -> None:
        self.state_path = Path(state_path)
        self.clock: Clock = clock or SystemClock()
        self.observer = observer
        self.workers = {e.name: EndpointWorker(e, self) for e in endpoints}
        self._db: DeliveryStore | None = None
        self._thread = StoreThread("webhooks")
        self._tasks: list[asyncio.Task[None]] = []
        self._unsaved: list[Delivery] = []
        self._dirty: set[EndpointWorker] = set()
        self._saving: asyncio.Task[None] | None = None
        self._save_failing = False

    @property
    def store(self) -> DeliveryStore:
        assert self._db is not None
        return self._db

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._thread.run(fn, *args)

    async def start(self) -> None:
        """Load each endpoint's cursor, state and pending retries; a new endpoint starts at
        the end of the log (it is not sent the past)."""
        self._db = await self.db(DeliveryStore, self.state_path)
        known = await self.db(self.store.endpoints)
        last = await self.db(self.store.last_seq)
        for worker in self.workers.values():
            if worker.name not in known:
                await self.db(self.store.add_endpoint, worker.name, last)
                known[worker.name] = (last, None, None)
            cursor, disabled_at, reason = known[worker.name]
            worker.seen = cursor
            worker.disabled = (disabled_at, reason or "disabled") if disabled_at is not None else None
            for delivery in await self.db(self.store.pending, worker.name):
                worker.attempts[delivery.seq] = delivery.attempts
                heapq.heappush(worker.retries, (delivery.next_at or 0.0, delivery.seq))
            self._tasks.append(asyncio.get_running_loop().create_task(worker.run(), name=f"webhook-{worker.name}"))
        if self.workers:
            log.info("webhooks: %s", ", ".join(f"{w.name} ({'disabled' if w.disabled else 'enabled'})" for w in self.workers.values()))

    async def close(self) -> None:
        """Stop sending; what was in flight is sent again after a restart (same id)."""
        await cancel_all([*self._tasks, *(t for w in self.workers.values() for t in w.in_flight)])
        self._tasks.clear()
        if self._saving is not None:
            await self._saving
        if self._unsaved or self._dirty:
            await self._save_now()
        for worker in self.workers.values():
            await worker.pool.aclose()
        if self._db is not None:
            await self.db(self._db.close)
            self._db = None
        self._thread.close()

    def offer(self, record: Record) -> None:
        for worker in self.workers.values():
            worker.offer(record)

    # -- progress, written in batches off the loop --------------------------------------------

    def save(self, delivery: Delivery | None, worker: EndpointWorker) -> None:
        """Record an outcome (if any) and the worker's cursor and state, soon, in a batch."""
        if delivery is not None:
            self._unsaved.append(delivery)
        self._dirty.add(worker)
        if self._saving is None:
            self._saving = asyncio.get_running_loop().create_task(self._save_soon())

    async def _save_soon(self) -> None:
        delay_s = SAVE_RETRY_FIRST_S
        try:
            while self._unsaved or self._dirty:
                if await self._save_now():
                    delay_s = SAVE_RETRY_FIRST_S
                else:  # kept: tried again later with what came since (the disk may be full for a while)
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, SAVE_RETRY_MAX_S)
        finally:
            self._saving = None

    async def _save_now(self) -> bool:
        """Write the outcomes, cursors and states gathered so far; on failure keep them for the
        next save (merged with newer outcomes: the newest of each delivery wins). Whether it saved."""
        deliveries, self._unsaved = self._unsaved, []
        workers, self._dirty = self._dirty, set()
        cursors = {w.name: c for w in workers if (c := w.cursor) is not None}
        disabled = {w.name: w.disabled for w in workers}
        try:
            await self.db(self.store.save, deliveries, cursors, disabled)
        except Exception as err:
            self._unsaved = list({(d.endpoint, d.seq): d for d in [*deliveries, *self._unsaved]}.values())
            self._dirty |= workers
            if not self._save_failing:  # once per streak of failures, not once per attempt
                log.error("could not record webhook deliveries (kept, retrying): %s", err)
            self._save_failing = True
            return False
        if self._save_failing:
            log.info("webhook deliveries recorded again")
            self._save_failing = False
        return True

    # -- the API --------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        return [{**w.endpoint.public(), "disabled": w.disabled is not None,
                 "disabled_reason": w.disabled[1] if w.disabled else None, "pending": w.pending, "cursor": w.cursor}
                for w in self.workers.values()]

    async def deliveries(self, *, failed_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        return await self.db(functools.partial(self.store.deliveries, failed_only=failed_only, limit=limit))

    async def retry(self, delivery_id: int) -> dict[str, Any]:
        """Send a stored delivery again now (same webhook-id): once, whatever its age."""
        delivery = await self.db(self.store.delivery, delivery_id)
        if delivery is None:
            raise UnknownDelivery(f"no webhook delivery {delivery_id}")
        worker = self.workers.get(delivery.endpoint)
        if worker is None:
            raise UnknownDelivery(f"delivery {delivery_id} is to {delivery.endpoint!r}, which is no longer configured")
        if worker.disabled is not None:
            raise MonitorError(f"endpoint {worker.name} is disabled ({worker.disabled[1]}): enable it first")
        record = await self.db(self.store.record, delivery.seq)
        if record is None:
            raise UnknownDelivery(f"event {delivery.seq} of delivery {delivery_id} is no longer kept")
        if delivery.seq not in worker.unsettled:
            worker.attempts.pop(delivery.seq, None)
            worker.unsettled.add(delivery.seq)
            worker.ready.append(_Due(record, delivery.attempts, manual=True))
            worker.wake.set()
        return {"id": delivery_id, "endpoint": worker.name, "event_id": delivery.seq, "msg_id": record.id, "state": "retrying"}

    def enable(self, name: str) -> dict[str, Any]:
        worker = self.workers.get(name)
        if worker is None:
            raise UnknownDelivery(f"no webhook endpoint {name!r} (configured: {', '.join(self.workers) or 'none'})")
        worker.enable()
        self.save(None, worker)
        return {**worker.endpoint.public(), "disabled": False}

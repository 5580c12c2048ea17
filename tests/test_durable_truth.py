"""What the daemon answers is what it stored: across kill -9 and SIGTERM restarts, a daemon
killed in the middle of a launch, and a full disk. A real daemon, real processes, real SQLite."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Procs
from test_daemon import Daemon, cli, public_dir  # noqa: F401  (public_dir is a fixture)
from test_engine_real import _reap_all, _subreaper

from monitor.client import DaemonUnreachable
from monitor.protocol import ProtocolError


@pytest.fixture
def reaper() -> Iterator[None]:
    """Wrappers of a killed daemon come to us (PID 1 here reaps nothing), and we reap them."""
    _subreaper(True)
    try:
        yield
    finally:
        me = psutil.Process()
        deadline = time.monotonic() + 10
        while me.children() and time.monotonic() < deadline:
            _reap_all()
            time.sleep(0.01)
        _reap_all()
        _subreaper(False)


def restart(procs: Procs, old: Daemon | None, socket_path: Path, state_dir: Path, how: int = signal.SIGKILL) -> Daemon:
    if old is not None:
        old.proc.send_signal(how)
        old.proc.wait(20)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # a killed daemon leaves its socket: wait for the new one's
    return Daemon(procs, socket_path, state_dir)


def commands(token: str) -> dict[int, list[str]]:
    """Every process running one of this test's commands (argv[1] starts with `token`)."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if len(cmdline) == 2 and cmdline[0] == "sleep" and cmdline[1].startswith(token) and proc.info["status"] != "zombie":
            found[proc.info["pid"]] = cmdline
    return found


def stop_all(daemon: Daemon) -> None:
    """Clean up after a test, which may have failed with the daemon down: then by hand."""
    try:
        with daemon.client() as client:
            for session in client.call("session.list"):
                client.call("session.stop", id=session["id"], signal="KILL", grace_s=1)
    except DaemonUnreachable:
        for proc in psutil.process_iter(["cmdline"]):
            if (proc.info["cmdline"] or [""])[0] == "sleep" and proc.parent() is not None and "monitor.wrapper" in " ".join(
                    proc.parent().cmdline()):
                proc.kill()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_restart_keeps_the_lock_of_a_launched_session_that_runs(procs: Procs, public_dir: Path, tmp_path: Path,  # noqa: F811
                                                                  reaper: None, how: int) -> None:
    work = tmp_path / "w"
    work.mkdir()
    sock, state = public_dir / "run" / "monitor.sock", tmp_path / "state"
    daemon = restart(procs, None, sock, state)
    started = json.loads(cli(daemon, "launch", "--json", "--", "sleep", "60", cwd=work).stdout)
    daemon = restart(procs, daemon, sock, state, how)
    try:
        with daemon.client() as client:
            assert [(lk["directory"], lk["pid"], lk["session_id"]) for lk in client.call("lock.list")] == [
                (str(work), started["pid"], started["id"])]
            assert client.call("session.get", id=started["id"])["state"] == "running"
            with pytest.raises(ProtocolError) as held:
                client.call("session.launch", argv=["true"], cwd=str(work))
            assert held.value.code == "lock_held"
            stopped = client.call("session.stop", id=started["id"], grace_s=2)
            assert (stopped["reason"], stopped["signal"]) == ("killed", 15)
            assert client.call("lock.list") == []
    finally:
        stop_all(daemon)


def _launch_without_waiting(sock: Path, work: Path, token: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    request = {"id": 1, "method": "session.launch", "params": {"argv": ["sleep", token], "cwd": str(work),
                                                                "env": {"PATH": os.environ["PATH"]}}}
    s.sendall(json.dumps(request).encode() + b"\n")
    return s


def test_kill_9_at_random_points_of_a_launch_leaves_no_untracked_command(procs: Procs, public_dir: Path,  # noqa: F811
                                                                          tmp_path: Path, reaper: None) -> None:
    """Every command that runs is a stored session, with its lock; a launch cut short before
    its go never runs and leaves no reservation behind."""
    rng = random.Random(9)
    token = f"3600.{os.getpid()}"
    sock, state = public_dir / "run" / "monitor.sock", tmp_path / "state"
    daemon = restart(procs, None, sock, state)
    launched = 0
    try:
        for i in range(14):
            work = tmp_path / f"w{i}"
            work.mkdir()
            with _launch_without_waiting(sock, work, f"{token}{i:02d}"):
                time.sleep(rng.uniform(0.0, 0.4))  # not a wait: where in the launch the kill falls
                daemon = restart(procs, daemon, sock, state)
            with daemon.client() as client:
                running = {s["pid"]: s for s in client.call("session.list")}
                locks = client.call("lock.list")
            found = commands(token)
            assert set(found) == set(running), f"untracked commands: {set(found) - set(running)}"
            assert all(lk["pid"] in running for lk in locks), f"a lock no running command holds: {locks}"
            assert sorted(lk["directory"] for lk in locks) == sorted(s["cwd"] for s in running.values())
            launched = max(launched, len(running))
            # a launch record outlives its restart only as a running session's
            assert {p.stem for p in (state / "exits").glob("*.launch")} <= {s["id"] for s in running.values()}
        assert launched > 0, "no launch got through: the kills all came too early to test anything"
    finally:
        stop_all(daemon)


STORAGE_MIB = 2


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, mounted by the test (root only), for the state directory."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "small"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORAGE_MIB}m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Take every free block of the file system at `path`."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    return filler


def status(daemon: Daemon) -> dict[str, Any]:
    with daemon.client() as client:
        answer: dict[str, Any] = client.call("daemon.status")
    return answer


def wait_for(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_full_disk_leaves_nothing_phantom_and_heals_by_itself(procs: Procs, public_dir: Path, tmp_path: Path,  # noqa: F811
                                                                small_disk: Path, reaper: None) -> None:
    work = tmp_path / "w"
    work.mkdir()
    sock, state = public_dir / "run" / "monitor.sock", small_disk / "state"
    daemon = restart(procs, None, sock, state)
    attached = procs.spawn("sleep", "60", cwd=work)
    token = f"3700.{os.getpid()}"
    try:
        with daemon.client() as client:
            session = client.call("session.attach", pid=attached.pid, lock=False)
            filler = fill(small_disk)
            # The WAL may still have room for a few small commits: ask until the store refuses.
            refused = None
            for i in range(200):
                directory = work / f"d{i}"
                directory.mkdir()
                try:
                    client.call("lock.acquire", directory=str(directory), by="ci")
                except ProtocolError as err:
                    refused = err
                    break
            assert refused is not None and refused.code == "storage" and "disk full" in refused.message, refused
            assert str(directory) not in [lk["directory"] for lk in client.call("lock.list")]  # nothing phantom
            with pytest.raises(ProtocolError) as launch:
                client.call("session.launch", argv=["sleep", token], cwd=str(work / "d0"), lock=False,
                            env={"PATH": os.environ["PATH"]})
            assert launch.value.code == "storage"
            assert commands(token) == {}  # a launch the store refused never ran
            assert len(client.call("session.list")) == 1
            # The kernel's news is not refused: the exit is kept, served, and stored once there is room.
            attached.kill()
            attached.wait()
            wait_for(lambda: client.call("session.get", id=session["id"])["state"] == "stopped")
            assert status(daemon)["store"] != "ok"
            assert "store FAILING: state store: disk full" in cli(daemon, "daemon", "status").stdout
        filler.unlink()
        wait_for(lambda: status(daemon)["store"] == "ok")
        with daemon.client() as client:
            client.call("lock.acquire", directory=str(directory), by="ci")
        daemon = restart(procs, daemon, sock, state)
        with daemon.client() as client:
            stopped = client.call("session.get", id=session["id"])
            assert (stopped["state"], stopped["reason"], stopped["signal"]) == ("stopped", "exited", 9)
            assert [lk["directory"] for lk in client.call("lock.list") if lk["kind"] == "manual"][-1] == str(directory)
    finally:
        stop_all(daemon)
        daemon.proc.terminate()
        daemon.proc.wait(10)


@pytest.mark.parametrize("target", ["group", "wrapper"])
def test_a_users_command_killed_while_the_daemon_is_down_reads_killed_not_lost(procs: Procs, public_dir: Path,  # noqa: F811
                                                                                tmp_path: Path, reaper: None,
                                                                                target: str) -> None:
    """The wrapper writes the exit file whatever signal reaches the command's process group (or
    itself), for any user: the restart then knows how the command died."""
    from test_daemon import NOBODY, _as_nobody

    if os.geteuid() != 0:
        pytest.skip("needs root to launch as a second uid")
    work = public_dir / "nobody-work"
    work.mkdir()
    work.chmod(0o777)
    sock, state = public_dir / "run" / "monitor.sock", tmp_path / "state"
    daemon = restart(procs, None, sock, state)
    answers = _as_nobody(sock, [{"method": "session.launch", "params": {
        "argv": ["sleep", "60"], "cwd": str(work), "env": {"PATH": os.environ["PATH"]}}}])
    session = answers[0]["result"]
    assert psutil.Process(session["pid"]).uids().real == NOBODY
    daemon.proc.kill()
    daemon.proc.wait(10)
    wrapper = psutil.Process(session["pid"]).ppid()
    if target == "group":
        os.killpg(session["pid"], signal.SIGTERM)
    else:
        os.kill(wrapper, signal.SIGTERM)  # forwarded to the command's group
    exit_file = state / "exits" / f"{session['id']}.exit"
    wait_for(exit_file.exists)
    daemon = restart(procs, None, sock, state)
    with daemon.client() as client:
        stopped = client.call("session.get", id=session["id"])
    assert (stopped["state"], stopped["reason"], stopped["signal"], stopped["evidence"]) == ("stopped", "exited", 15, "exit_file")
    daemon.proc.terminate()
    daemon.proc.wait(10)


def test_launched_sessions_are_recovered_from_their_files_when_the_state_file_is_lost(
        procs: Procs, public_dir: Path, tmp_path: Path, reaper: None) -> None:  # noqa: F811
    """A corrupt state file is moved aside; what launches left in the exit directory brings
    back their sessions: one still running with its lock, one that ended meanwhile, stopped
    once with the status its wrapper kept."""
    sock, state = public_dir / "run" / "monitor.sock", tmp_path / "state"
    running_dir, ended_dir = tmp_path / "running", tmp_path / "ended"
    running_dir.mkdir()
    ended_dir.mkdir()
    daemon = restart(procs, None, sock, state)
    try:
        with daemon.client() as client:
            runs = client.call("session.launch", argv=["sleep", "60"], cwd=str(running_dir), env={"PATH": os.environ["PATH"]})
            ends = client.call("session.launch", argv=["sleep", "61"], cwd=str(ended_dir), env={"PATH": os.environ["PATH"]})
        daemon.proc.kill()
        daemon.proc.wait(10)
        os.kill(ends["pid"], signal.SIGKILL)
        wait_for((state / "exits" / f"{ends['id']}.exit").exists)
        (state / "state.db").write_bytes(b"this is not a database" * 100)
        for suffix in ("-wal", "-shm"):
            (state / f"state.db{suffix}").unlink(missing_ok=True)
        daemon = restart(procs, None, sock, state)
        with daemon.client() as client:
            running = client.call("session.get", id=runs["id"])
            ended = client.call("session.get", id=ends["id"])
            locks = client.call("lock.list")
        assert (running["state"], running["pid"], running["cwd"]) == ("running", runs["pid"], str(running_dir))
        assert [(lk["directory"], lk["pid"]) for lk in locks] == [(str(running_dir), runs["pid"])]
        assert (ended["state"], ended["reason"], ended["signal"], ended["evidence"]) == ("stopped", "exited", 9, "exit_file")
        assert list(state.glob("state.db.corrupt-*"))
    finally:
        stop_all(daemon)
        daemon.proc.terminate()
        daemon.proc.wait(10)

"""Session hooks on a real daemon: the status they see, their timeout, the config's hooks
and their order, where their output goes, and whose they run as."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, ROOT, Procs
from test_daemon import NOBODY, _as_nobody
from test_engine_real import _subreaper
from test_subscribe import Daemons, Stream, lock_cycle

from monitor.client import Client


@pytest.fixture
def start(procs: Procs, tmp_path: Path) -> Iterator[Daemons]:
    daemons = Daemons(procs, tmp_path)
    yield daemons
    daemons.close()


PATH = {"PATH": os.environ["PATH"]}


def eventually(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """`check()`'s first truthy value (a file a hook writes has no event to wait on)."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"not within {timeout_s}s"
        time.sleep(0.01)
    return value


def written(path: Path) -> str:
    """What a hook wrote to `path` with `... > path.tmp && mv path.tmp path` (whole, once there)."""
    text: str = eventually(lambda: path.exists() and path.read_text())
    return text


def monitor_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.startswith("MONITOR_"))


def is_hook_failed(session_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: ev["type"] == "hook.failed" and ev["session_id"] == session_id


def test_on_complete_sees_the_exit_status_reason_and_labels(start: Daemons, tmp_path: Path) -> None:
    d = start()
    work = tmp_path / "w"
    work.mkdir()
    hook = "env > env.tmp && mv env.tmp env.out"
    done = subprocess.run([PYTHON, "-m", "monitor", "--socket", str(d.socket), "launch", "--wait", "--json", "--label", "adapter=demo",
                           "--label", "my-key=v 1", "--on-complete", hook, "--", "sh", "-c", "exit 7"],
                          cwd=work, capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, done.stderr
    session = json.loads(done.stdout)
    env = monitor_env(written(work / "env.out"))
    duration = float(env.pop("MONITOR_DURATION_S"))
    assert 0 <= duration < 60 and abs(duration - session["duration_s"]) < 0.01
    assert env == {"MONITOR_SESSION_ID": session["id"], "MONITOR_CWD": str(work), "MONITOR_PID": str(session["pid"]),
                   "MONITOR_EXIT_CODE": "7", "MONITOR_SIGNAL": "", "MONITOR_REASON": "exited",
                   "MONITOR_LABEL_ADAPTER": "demo", "MONITOR_LABEL_MY_KEY": "v 1"}

    (work / "env.out").unlink()
    with Client(d.socket) as client:
        killed = client.call("session.launch", argv=["sleep", "60"], cwd=str(work), env=PATH, on_complete=hook)
        stopped = client.call("session.stop", id=killed["id"], signal="KILL")
    assert (stopped["reason"], stopped["signal"], stopped["exit_code"]) == ("killed", 9, None)
    env = monitor_env(written(work / "env.out"))
    assert (env["MONITOR_SESSION_ID"], env["MONITOR_EXIT_CODE"], env["MONITOR_SIGNAL"], env["MONITOR_REASON"]) == (
        killed["id"], "", "9", "killed")
    assert not any(k.startswith("MONITOR_LABEL_") for k in env)


def test_a_hanging_hook_is_killed_at_its_timeout_with_what_it_started(start: Daemons, tmp_path: Path) -> None:
    d = start("hook_timeout_s = 1\n")
    work = tmp_path / "w"
    work.mkdir()
    _subreaper(True)  # the hook's background child, orphaned when the hook dies, comes to us to be reaped
    try:
        with Client(d.socket) as client, Stream(d.socket, types=["hook.failed"]) as failures:
            session = client.call("session.launch", argv=["true"], cwd=str(work), env=PATH,
                                  on_complete="echo $$ > hook.pid; sleep 600 & echo $! > bg.pid; wait")
            failed = failures.next()
        hook_pid, bg_pid = int(written(work / "hook.pid")), int(written(work / "bg.pid"))
        assert (failed["session_id"], failed["hook"], failed["exit_code"], failed["signal"], failed["error"]) == (
            session["id"], "on_complete", None, 9, "killed at its 1s timeout")
        assert not os.path.exists(f"/proc/{hook_pid}")  # killed, and reaped by the daemon
        deadline = time.monotonic() + 10
        while (reaped := os.waitpid(bg_pid, os.WNOHANG))[0] == 0:  # what it started in the background was killed too
            assert time.monotonic() < deadline, "the hook's background child still runs"
            time.sleep(0.01)
        assert os.WIFSIGNALED(reaped[1]) and os.WTERMSIG(reaped[1]) == signal.SIGKILL
        with Client(d.socket) as client:
            assert 'monitor_hooks_total{hook="on_complete",outcome="timeout"} 1.0' in client.call("metrics")
    finally:
        _subreaper(False)
    assert f"on_complete hook of session {session['id']} killed at its 1s timeout" in d.stderr()


CONFIG_HOOKS = """
hook_timeout_s = 30
[hooks]
on_start = 'while [ ! -e go ]; do sleep 0.01; done; echo "config.on_start code=[$MONITOR_EXIT_CODE] reason=[$MONITOR_REASON]" >> hooks.txt'
on_complete = 'echo "config.on_complete code=[$MONITOR_EXIT_CODE] reason=[$MONITOR_REASON]" >> hooks.txt'
"""


def test_config_hooks_run_first_on_start_sees_no_status_and_a_failing_hook_blocks_nothing(
        start: Daemons, procs: Procs, tmp_path: Path) -> None:
    d = start(CONFIG_HOOKS)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "go").touch()  # its config on_start goes straight on
    own = {"on_start": 'echo "on_start code=[$MONITOR_EXIT_CODE] reason=[$MONITOR_REASON]" >> hooks.txt',
           "on_complete": 'echo "on_complete code=[$MONITOR_EXIT_CODE]" >> hooks.txt; exit 3'}
    with Client(d.socket) as client, Stream(d.socket, types=["session.stopped", "hook.failed"]) as events:
        one = client.call("session.launch", argv=["sh", "-c", "exit 5"], cwd=str(first), env=PATH, **own)
        events.until(lambda ev: ev["type"] == "session.stopped" and ev["session_id"] == one["id"])
        # Its hooks wait behind its config on_start (until `go`); meanwhile everything else goes on.
        lock_cycle(client, tmp_path / "elsewhere")
        two = client.call("session.launch", argv=["sh", "-c", "exit 0"], cwd=str(second), env=PATH, **own)
        failed_two = events.until(is_hook_failed(two["id"]))[-1]
        assert not (first / "hooks.txt").exists()
        (first / "go").touch()
        failed_one = events.until(is_hook_failed(one["id"]))[-1]
    assert (failed_one["hook"], failed_one["exit_code"], failed_one["signal"], failed_one["error"]) == ("on_complete", 3, None, None)
    assert (failed_two["hook"], failed_two["exit_code"]) == ("on_complete", 3)
    # The session's own on_start ran after the stop (behind the config's), yet saw the session as it started.
    assert (first / "hooks.txt").read_text().splitlines() == [
        "config.on_start code=[] reason=[]",
        "on_start code=[] reason=[]",
        "config.on_complete code=[5] reason=[exited]",
        "on_complete code=[5]",
    ]
    assert (second / "hooks.txt").read_text().splitlines() == [
        "config.on_start code=[] reason=[]", "on_start code=[] reason=[]",
        "config.on_complete code=[0] reason=[exited]", "on_complete code=[0]"]


def test_hook_output_goes_to_the_session_log_or_else_the_daemons(start: Daemons, procs: Procs, tmp_path: Path) -> None:
    d = start()
    work = tmp_path / "w"
    work.mkdir()
    attached_proc = procs.spawn("sleep", "60", cwd=work)
    with Client(d.socket) as client, Stream(d.socket, types=["hook.failed"]) as failures:
        launched = client.call("session.launch", argv=["sh", "-c", "echo from the command"], cwd=str(work), env=PATH,
                               on_start="echo from on_start", on_complete="echo from on_complete; echo on stderr >&2; exit 4")
        assert failures.next()["session_id"] == launched["id"]  # the hook is over, its output written
        attached = client.call("session.attach", pid=attached_proc.pid, lock=False,
                               on_complete='echo "attached $MONITOR_SESSION_ID says"; echo "and on stderr" >&2; exit 4')
        client.call("session.stop", id=attached["id"], grace_s=2)
        assert failures.next()["session_id"] == attached["id"]
    logs = subprocess.run([PYTHON, "-m", "monitor", "--socket", str(d.socket), "logs", launched["id"]], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert logs.returncode == 0, logs.stderr
    assert sorted(logs.stdout.splitlines()) == ["from on_complete", "from on_start", "from the command", "on stderr"]
    assert logs.stdout.splitlines()[-2:] == ["from on_complete", "on stderr"]
    stderr = d.stderr()
    what = f"on_complete hook of session {attached['id']}"
    assert f"{what}: attached {attached['id']} says" in stderr and f"{what}: and on stderr" in stderr
    assert "from on_complete" not in stderr  # the launched session's went to its log only


def test_a_hook_whose_directory_is_gone_fails_rather_than_run_elsewhere(start: Daemons, tmp_path: Path) -> None:
    d = start()
    work = tmp_path / "w"
    work.mkdir()
    where = tmp_path / "where"
    with Client(d.socket) as client, Stream(d.socket, types=["hook.failed"]) as failures:
        session = client.call("session.launch", argv=["sh", "-c", "cd .. && rmdir w"], cwd=str(work), env=PATH,
                              on_complete=f"pwd > {where}")
        failed = failures.next()
    assert (failed["session_id"], failed["hook"], failed["exit_code"], failed["signal"], failed["error"]) == (
        session["id"], "on_complete", None, None, f"could not run: {work} is not a directory")
    assert not work.exists() and not where.exists()


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second uid")


def test_hooks_run_as_the_sessions_owner_without_the_daemons_groups(as_root: None, start: Daemons) -> None:
    groups = os.getgroups()
    os.setgroups([0, 4])  # the daemon inherits supplementary groups; a hook as nobody must not keep them
    try:
        d = start()
    finally:
        os.setgroups(groups)
    work = start.public / "nobody-work"
    work.mkdir()
    work.chmod(0o777)
    hook = "{ id -u; id -g; id -G; pwd; } > {name}.tmp && mv {name}.tmp {name}"
    with Stream(d.socket, types=["hook.failed"]) as failures:
        answers = _as_nobody(d.socket, [{"method": "session.launch", "params": {
            "argv": ["true"], "cwd": str(work), "env": PATH, "on_start": hook.replace("{name}", "start.txt"),
            "on_complete": hook.replace("{name}", "complete.txt") + "; exit 2"}}])
        session = answers[0]["result"]
        failed = failures.next()
    assert (failed["session_id"], failed["hook"], failed["exit_code"]) == (session["id"], "on_complete", 2)
    for name in ("start.txt", "complete.txt"):
        assert (work / name).read_text().split("\n") == [str(NOBODY), str(NOBODY), str(NOBODY), str(work), ""], name
        assert (work / name).stat().st_uid == NOBODY


@pytest.mark.parametrize("swap", ["file", "directory"])
def test_a_hook_never_appends_to_a_file_the_user_swapped_in_for_the_log(as_root: None, start: Daemons, swap: str) -> None:
    """The daemon (root) appends a hook's output to the session's log: after the user replaced
    the log with a link to a file of root's, that file stays untouched."""
    d = start()
    work = start.public / "nobody-work"
    (work / "logs").mkdir(parents=True)
    work.chmod(0o777)
    os.chown(work / "logs", NOBODY, NOBODY)  # the user's own directory: a log may go there
    victim_dir = start.public / "roots"
    victim_dir.mkdir()
    victim = victim_dir / "agent.log"
    victim.write_text("root's own\n")
    victim.chmod(0o644)
    swap_it = (f"rm logs/agent.log; ln -s {victim} logs/agent.log" if swap == "file" else
               f"mv logs logs.old; ln -s {victim_dir} logs")
    with Stream(d.socket, types=["hook.failed"]) as failures:
        answers = _as_nobody(d.socket, [{"method": "session.launch", "params": {
            "argv": ["sh", "-c", swap_it], "cwd": str(work), "env": PATH, "log": str(work / "logs" / "agent.log"),
            "on_complete": "echo PWNED; exit 1"}}])
        session = answers[0]["result"]
        assert failures.next()["session_id"] == session["id"]
    assert victim.read_text() == "root's own\n"
    assert f"on_complete hook of session {session['id']}: PWNED" in d.stderr()  # to the daemon's log instead

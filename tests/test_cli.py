"""The command line, run as a user would: real processes, real exit statuses."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, Procs

MONITOR = [PYTHON, "-m", "monitor"]


def monitor(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MONITOR, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def start_monitor(procs: Procs, *args: str, ready: str = "listening with") -> subprocess.Popen[bytes]:
    """`monitor ARGS -v`, returned once it says it is ready."""
    proc = procs.spawn(*MONITOR, *args, "-v", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    for line in proc.stderr:
        if ready.encode() in line:
            return proc
    raise AssertionError(f"monitor never listened: exit {proc.wait()}")


def gated_grandchild(procs: Procs, gate: Path, then: str) -> int:
    """A grandchild (reaped by its own parent) that runs `then` once `gate` exists."""
    _, pid = procs.grandchild(f"while [ ! -e {gate} ]; do sleep 0.02; done; {then}")
    return pid


def wait_started(procs: Procs, gate: Path, *args: str) -> tuple[int, str, str]:
    """`monitor wait ARGS`, the gate opened only once it watches: no race with its start-up.
    (It says "waiting for" once every watch is set; it used to say so before, and a grandchild
    that ended in between, reaped by its parent, read 'status unknown'.)"""
    waiter = start_monitor(procs, "wait", *args, ready="waiting for")
    gate.touch()
    out, err = waiter.communicate(timeout=20)
    return waiter.returncode, out.decode(), err.decode()


def test_wait_returns_a_grandchilds_exit_code(procs: Procs, tmp_path: Path) -> None:
    pid = gated_grandchild(procs, tmp_path / "go", "exit 9")
    code, out, err = wait_started(procs, tmp_path / "go", str(pid))
    assert code == 9, err
    assert f"{pid}: exited with code 9" in out  # the line people read


def test_wait_reports_a_signal_as_128_plus_it(procs: Procs, tmp_path: Path) -> None:
    pid = gated_grandchild(procs, tmp_path / "go", "kill -TERM $$")
    code, out, _ = wait_started(procs, tmp_path / "go", "--json", str(pid))
    assert code == 128 + 15
    line = json.loads(out)
    assert (line["pid"], line["signal"], line["exit_code"], line["status"]) == (pid, 15, None, 143)


def test_wait_times_out_with_124(procs: Procs) -> None:
    sleeper = procs.spawn("sleep", "60")
    result = monitor("wait", "--timeout", "0.3", str(sleeper.pid))
    assert result.returncode == 124
    assert "timed out after 0.3s" in result.stderr


def test_wait_on_a_pid_that_does_not_exist_exits_2(procs: Procs) -> None:
    gone = procs.spawn("true")
    gone.wait()
    result = monitor("wait", str(gone.pid))
    assert result.returncode == 2
    assert f"no process with PID {gone.pid}" in result.stderr


def test_wait_any_returns_with_the_first(procs: Procs) -> None:
    fast, slow = procs.sh("sleep 0.3; exit 1"), procs.spawn("sleep", "60")
    result = monitor("wait", "--any", "--json", str(slow.pid), str(fast.pid))
    assert result.returncode == 1
    assert [json.loads(line)["pid"] for line in result.stdout.splitlines()] == [fast.pid]


def test_wait_rejects_a_bad_pid() -> None:
    result = monitor("wait", "abc")
    assert result.returncode == 2
    assert "not a PID: 'abc'" in result.stderr


def test_events_follow_a_tree_until_it_is_gone(procs: Procs) -> None:
    root = procs.sh("read _; sleep 0.2 & wait; exit 6", stdin=subprocess.PIPE)
    follower = start_monitor(procs, "events", "--json", "--pid", str(root.pid), "--tree")
    assert root.stdin is not None
    root.stdin.close()
    out, _ = follower.communicate(timeout=20)
    assert follower.returncode == 0
    lines = [json.loads(line) for line in out.decode().splitlines()]
    kinds = [(e["type"], e["pid"]) for e in lines]
    forks = [pid for kind, pid in kinds if kind == "process.forked"]
    assert len(forks) == 1 and kinds[-1] == ("process.exited", root.pid)
    assert ("process.exited", forks[0]) in kinds
    assert lines[-1]["exit_code"] == 6


def test_events_stream_every_process_and_end_on_sigint(procs: Procs) -> None:
    stream = start_monitor(procs, "events", "--json", "--type", "exit")
    child = procs.sh("exit 3")
    child.wait()
    assert stream.stdout is not None
    lines = []
    for raw in stream.stdout:
        lines.append(json.loads(raw))
        if lines[-1]["pid"] == child.pid:
            break
    stream.send_signal(signal.SIGINT)
    rest, err = stream.communicate(timeout=10)
    assert stream.returncode == 0, err
    lines += [json.loads(line) for line in rest.decode().splitlines()]
    assert {e["type"] for e in lines} == {"process.exited"}
    assert next(e for e in lines if e["pid"] == child.pid)["exit_code"] == 3
    assert b"Traceback" not in err


def test_events_end_quietly_when_the_reader_goes_away(procs: Procs) -> None:
    pipeline = procs.sh(f"{PYTHON} -m monitor events | head -n 1 >/dev/null", cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while pipeline.poll() is None and time.monotonic() < deadline:
        subprocess.run(["true"])  # events for it to print
        time.sleep(0.05)
    assert pipeline.poll() is not None, "monitor events kept running with nobody reading"
    assert pipeline.stderr is not None
    assert b"Traceback" not in pipeline.stderr.read()


def test_events_tree_needs_pid() -> None:
    result = monitor("events", "--tree")
    assert result.returncode == 2
    assert "--tree needs --pid" in result.stderr


def test_doctor_reports_every_source_and_why() -> None:
    result = monitor("doctor", "--json")
    report = json.loads(result.stdout)
    assert set(report["sources"]) == {"netlink", "pidfd", "inotify", "poll"}
    for info in report["sources"].values():
        assert isinstance(info["available"], bool) and info["reason"]
    assert report["selected"] in ("netlink", "pidfd", "poll")
    assert report["decoder"]["in_use"] in ("native", "python")
    assert result.returncode == 0


def test_doctor_reads_well() -> None:
    result = monitor("doctor")
    assert result.returncode == 0
    assert "selected:" in result.stdout and "netlink" in result.stdout


@pytest.mark.parametrize("args", [["wait", "1", "--source", "nope"], ["events", "--type", "comm"]])
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    assert monitor(*args).returncode == 2

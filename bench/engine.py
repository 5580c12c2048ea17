"""The whole Engine (source, tracker, locks, SQLite), in a process of its own
(bench/engine_host.py): exit -> auto lock gone in memory and -> `LockReleased` committed and
delivered, p50/p99, against one bare SQLite commit; then 10,000 sessions with locks
(--quick: 1,000): memory, state file size, idle CPU, a restart's reconcile time (against a
start on an empty state file), exits with them all held, and all of them exiting at once.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import SOURCE_LABELS, BenchError, Ctx, Helper, answer, log, role, time_one_exit
from bench.stats import median, ratio, spread
from bench.table import fmt_us, fmt_x, table

TITLE = "Engine (exit → lock released and committed; sessions at scale)"


@dataclass(frozen=True)
class Sizes:
    engine_rounds: int  # sources interleaved: one engine per source per round
    engine_exit_n: int  # exit -> lock released samples per source (all rounds together)
    engine_n: int  # sessions with locks held at once
    engine_held_n: int  # exit samples taken while those are held
    engine_idle_s: float  # how long the idle CPU of the loaded engine is measured
    warmup: int  # samples dropped after each engine start


FULL = Sizes(engine_rounds=5, engine_exit_n=1000, engine_n=10_000, engine_held_n=100, engine_idle_s=5.0, warmup=3)
QUICK = Sizes(engine_rounds=2, engine_exit_n=50, engine_n=1_000, engine_held_n=10, engine_idle_s=1.0, warmup=1)


def engine_methods(ctx: Ctx) -> list[str]:
    return ["netlink_native", "netlink_python", "pidfd"] if ctx.native else ["netlink_python", "pidfd"]


def start_engine(ctx: Ctx, method: str, state: Path) -> tuple[Helper, dict[str, Any]]:
    """An engine process on `state`, once its start() has returned, and what its READY said."""
    helper = role("engine_host", method, str(state), name=f"engine ({method})")
    try:
        line = helper.expect_line("READY", 120 + ctx.sizes.engine_n / 100)
    except BaseException:
        helper.close(abandon=True)
        raise
    helper.ready = line.split()
    return helper, json.loads(line.split(" ", 1)[1])


def sqlite_commit_floor(directory: Path, n: int = 200) -> dict[str, Any]:
    """The floor under "committed": one small transaction the way the Store commits (WAL,
    synchronous=FULL, BEGIN IMMEDIATE), on the file system that holds the engines' state."""
    db = sqlite3.connect(directory / "floor.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        times = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t(v) VALUES (?)", ("x" * 300,))
            db.execute("COMMIT")
            times.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        db.close()
    return {"n": n, **spread(times)}


def engine_exit(ctx: Ctx, engine: Helper, directory: Path) -> dict[str, int] | None:
    """One session: a target (our child, not the engine's) attached with an auto lock on
    `directory` of its own, then released; the engine's stamps of its end. None if none came."""
    directory.mkdir(parents=True)
    def arm(pid: int) -> None:
        engine.send(f"A {pid} {directory}")
        engine.expect(f"A {pid}", 30)

    timed = time_one_exit(ctx, engine, arm, "R", 10)
    if timed is None:
        return None
    t_exit, words, _read_ns = timed
    observed, kernel, memory, lock, stop = map(int, words[2:7])
    return {"exit": t_exit, "observed": observed, "kernel": kernel, "memory": memory, "lock": lock, "stop": stop}


def summarize_engine_exits(samples: list[dict[str, int]], missed: int) -> dict[str, Any]:
    def since_exit(stamp: str) -> list[float]:
        return [(s[stamp] - s["exit"]) / 1000 for s in samples if s[stamp]]

    result: dict[str, Any] = {"n": len(samples), "missed": missed, "memory": spread(since_exit("memory")),
                              "committed": spread(since_exit("lock")), "stopped": spread(since_exit("stop"))}
    # Where the time goes (medians): the source emits `Exited`, the lock goes in memory,
    # then the transaction commits and the listener hears of it.
    parts = {
        "exit_to_kernel_us": [(s["kernel"] - s["exit"]) / 1000 for s in samples if s["kernel"]],
        "exit_to_observed_us": [(s["observed"] - s["exit"]) / 1000 for s in samples if s["observed"]],
        "observed_to_memory_us": [(s["memory"] - s["observed"]) / 1000 for s in samples if s["observed"] and s["memory"]],
        "memory_to_committed_us": [(s["lock"] - s["memory"]) / 1000 for s in samples if s["memory"] and s["lock"]],
    }
    result["breakdown_median_us"] = {k: median(v) for k, v in parts.items() if v}
    return result


def engine_exits(ctx: Ctx, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Exit -> lock gone, per source, interleaved in rounds like the latency benchmark; each
    round a fresh engine on a fresh state file."""
    rounds, total = ctx.sizes.engine_rounds, ctx.sizes.engine_exit_n
    samples: dict[str, list[dict[str, int]]] = {m: [] for m in methods}
    missed = dict.fromkeys(methods, 0)
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for method in order:
            n = total // rounds + (1 if r < total % rounds else 0)
            log(f"engine exits round {r + 1}/{rounds}: {method} x{n}")
            run_dir = Path(tempfile.mkdtemp(prefix=f"engine-exit-{method}-", dir=ctx.tmp))
            engine, _ready = start_engine(ctx, method, run_dir / "state.db")
            try:
                for i in range(ctx.sizes.warmup + n):  # the latency benchmark's warmup
                    sample = engine_exit(ctx, engine, run_dir / f"s{i:04d}")
                    if i < ctx.sizes.warmup:
                        continue
                    if sample is None:
                        missed[method] += 1
                    else:
                        samples[method].append(sample)
            finally:
                engine.close()
    return {m: summarize_engine_exits(samples[m], missed[m]) for m in methods}


def engine_scale_run(ctx: Ctx, method: str) -> dict[str, Any]:
    """`engine_n` idle processes attached as sessions with a lock each; memory, state file,
    idle CPU; a restart on that state with all of them alive; exits while they are held;
    then all of them killed at once."""
    n = ctx.sizes.engine_n
    run_dir = Path(tempfile.mkdtemp(prefix=f"engine-scale-{method}-", dir=ctx.tmp))
    state = run_dir / "state.db"
    helpers: list[Helper] = []
    ok = False
    try:
        spawner = Helper("spawner", [ctx.bins["spawner"], str(n)], stop_signal=signal.SIGTERM)
        helpers.append(spawner)
        pids = []
        while (line := spawner.readline(120)) != "READY":
            pids.append(int(line))
        if len(pids) != n:
            raise BenchError(f"the spawner started only {len(pids)} of {n} processes")
        jobs = []
        for i, pid in enumerate(pids):
            directory = run_dir / "s" / f"{i:05d}"
            directory.mkdir(parents=True)
            jobs.append(f"{pid} {directory}\n")
        job_file = run_dir / "sessions.txt"
        job_file.write_text("".join(jobs))

        engine, empty = start_engine(ctx, method, state)
        helpers.append(engine)
        engine.send(f"F {job_file}")
        attached = answer(engine, "F", 600 + n / 10)
        engine.send(f"I {ctx.sizes.engine_idle_s}")
        idle = answer(engine, "I", ctx.sizes.engine_idle_s + 60)
        engine.send("C")
        closed = answer(engine, "C", 120)
        helpers.remove(engine)
        engine.close()
        state_files = {path.name: path.stat().st_size for path in sorted(run_dir.glob("state.db*"))}

        log(f"engine scale: {method}, restarting on {n:,} live sessions")
        engine, restart = start_engine(ctx, method, state)
        helpers.append(engine)
        held: list[dict[str, int]] = []
        held_missed = 0
        for i in range(ctx.sizes.engine_held_n):
            sample = engine_exit(ctx, engine, run_dir / "held" / f"p{i:04d}")
            if sample is None:
                held_missed += 1
            else:
                held.append(sample)
        engine.send(f"K {n}")
        engine.expect("K", 10)
        t_kill = time.monotonic_ns()
        spawner.proc.send_signal(signal.SIGTERM)  # it SIGKILLs all n and reaps them
        burst = answer(engine, "X", 600)
        spawner.expect("DONE", 120)
        engine.send("C")
        answer(engine, "C", 120)
        helpers.remove(engine)
        engine.close()

        log(f"engine scale: {method}, restarting on {n:,} stopped sessions")
        engine, after_stop = start_engine(ctx, method, state)  # the history: what a restart loads
        helpers.append(engine)
        ok = True
    finally:
        for helper in reversed(helpers):
            helper.close(abandon=not ok)
    rss_delta = attached["rss_kib_after"] - attached["rss_kib_before"]
    state_bytes = sum(state_files.values())
    return {
        "n": n, "sessions": attached["sessions"], "locks": attached["locks"],
        "attach_s": attached["attach_s"], "attach_us_per_session": attached["attach_s"] / n * 1e6,
        "attach_chunk_us": attached["attach_chunk_us"], "cpu_ms_to_attach": attached["cpu_us"] / 1000,
        "rss_delta_kib": rss_delta, "rss_bytes_per_session": rss_delta * 1024 / n,
        "fds_delta": attached["fds_after"] - attached["fds_before"], "nofile_limit": attached["nofile_limit"],
        "idle_cpu_percent": idle["cpu_us"] / idle["wall_s"] / 1e4, "idle_s": idle["wall_s"],
        "close_s": closed["close_s"], "state_files": state_files, "state_bytes": state_bytes,
        "state_bytes_per_session": state_bytes / n,
        "empty_start_s": empty["start_s"], "restart_s": restart["start_s"],
        "restart_vs_empty_start": ratio(restart["start_s"], empty["start_s"]),
        "restart_sessions": restart["sessions"], "restart_locks": restart["locks"],
        "restart_rss_delta_kib": restart["rss_kib_after"] - restart["rss_kib_before"],
        "stopped_restart_s": after_stop["start_s"], "stopped_restart_sessions_in_memory": after_stop["sessions_in_memory"],
        "stopped_restart_sessions": after_stop["sessions"], "stopped_restart_locks": after_stop["locks"],
        "stopped_restart_rss_delta_kib": after_stop["rss_kib_after"] - after_stop["rss_kib_before"],
        "held": summarize_engine_exits(held, held_missed),
        "kill_all": {
            "locks_released": burst["memory"], "committed": burst["committed"], "stopped": burst["stopped"],
            "to_first_release_s": (burst["first_memory_ns"] - t_kill) / 1e9,
            "to_last_release_s": (burst["last_memory_ns"] - t_kill) / 1e9,
            "to_first_committed_s": (burst["first_committed_ns"] - t_kill) / 1e9,
            "to_last_committed_s": (burst["last_committed_ns"] - t_kill) / 1e9,
            "overruns": burst["stats"].get("overruns"),
        },
    }


def run(ctx: Ctx) -> dict[str, Any]:
    methods = engine_methods(ctx)
    floor = sqlite_commit_floor(ctx.tmp)
    exits = engine_exits(ctx, methods)
    for res in exits.values():
        res["commit_vs_floor"] = ratio(res["breakdown_median_us"].get("memory_to_committed_us"), floor["p50_us"])
    scale: dict[str, Any] = {}
    for method in methods:
        log(f"engine scale: {method}, {ctx.sizes.engine_n:,} sessions")
        try:
            scale[method] = engine_scale_run(ctx, method)
        except BenchError as err:  # one source failing still leaves the others' numbers
            log(f"engine scale: {method} failed: {err}")
            scale[method] = {"status": "failed", "error": str(err)}
            continue
        held, alone = scale[method]["held"], exits[method]
        held["committed_p50_vs_alone"] = ratio(held["committed"]["p50_us"], alone["committed"]["p50_us"])
        held["memory_p50_vs_alone"] = ratio(held["memory"]["p50_us"], alone["memory"]["p50_us"])
    if not ctx.native:
        exits["netlink_native"] = scale["netlink_native"] = {"status": "not built"}
    return {"baseline": "sqlite_commit", "sqlite_commit": floor, "rounds": ctx.sizes.engine_rounds,
            "exit": exits, "scale": {"n": ctx.sizes.engine_n, "runs": scale}}


def tables(res: dict[str, Any]) -> str:
    floor = res["sqlite_commit"]
    rows, parts_rows = [], []
    for method, m in res["exit"].items():
        label = SOURCE_LABELS.get(method, method)
        if "n" not in m:
            rows.append([label, m.get("status", "–")] + ["–"] * 6)
            continue
        n = str(m["n"]) + (f" ({m['missed']} missed)" if m["missed"] else "")
        rows.append([label, n, fmt_us(m["memory"]["p50_us"]), fmt_us(m["memory"]["p99_us"]),
                     fmt_us(m["committed"]["p50_us"]), fmt_us(m["committed"]["p99_us"]),
                     fmt_us(m["stopped"]["p50_us"]), fmt_us(m["stopped"]["p99_us"])])
        b = m["breakdown_median_us"]
        parts_rows.append([label, fmt_us(b.get("exit_to_kernel_us")), fmt_us(b.get("exit_to_observed_us")),
                           fmt_us(b.get("observed_to_memory_us")), fmt_us(b.get("memory_to_committed_us")),
                           fmt_x(m["commit_vs_floor"])])
    exits = table(["source", "n", "lock gone in memory p50", "p99", "`LockReleased` committed p50", "p99",
                      "`SessionStopped` committed p50", "p99"], rows)
    parts = table(["source", "exit → kernel stamp", "exit → source emits `Exited`", "emits → lock gone in memory",
                      "lock gone → `LockReleased` delivered", "that vs one SQLite commit"], parts_rows)

    state_rows: list[list[str]] = []
    restart_rows: list[list[str]] = []
    held_rows: list[list[str]] = []
    failures: list[str] = []
    n = res["scale"]["n"]
    for method, run in res["scale"]["runs"].items():
        label = SOURCE_LABELS.get(method, method)
        if "n" not in run:
            for rows_, columns in ((state_rows, 8), (restart_rows, 7), (held_rows, 11)):
                rows_.append([label, run.get("status", "–")] + ["–"] * (columns - 2))
            if "error" in run:
                failures.append(f"- {label}: {run['error']}")
            continue
        chunks = run["attach_chunk_us"]
        state_rows.append([
            label, f"{run['sessions']:,} / {run['locks']:,}",
            f"{run['attach_s']:,.1f} s ({chunks[0]:,.0f} → {chunks[-1]:,.0f} µs each)", f"{run['cpu_ms_to_attach'] / 1000:,.1f} s",
            f"{run['rss_delta_kib'] / 1024:.1f} MiB ({run['rss_bytes_per_session']:,.0f} B each)", f"+{run['fds_delta']:,}",
            f"{run['state_bytes'] / 2**20:.1f} MiB ({run['state_bytes_per_session']:,.0f} B each)",
            f"{run['idle_cpu_percent']:.1f}%",
        ])
        restart_rows.append([
            label, f"{run['restart_s'] * 1000:,.0f} ms", f"{run['restart_sessions']:,} / {run['restart_locks']:,}",
            f"{fmt_x(run['restart_vs_empty_start'])} ({run['empty_start_s'] * 1000:,.0f} ms)",
            f"{run['restart_rss_delta_kib'] / 1024:.1f} MiB",
            f"{run['stopped_restart_s'] * 1000:,.0f} ms", f"{run['stopped_restart_sessions_in_memory']:,}",
        ])
        h, k = run["held"], run["kill_all"]
        held_n = str(h["n"]) + (f" ({h['missed']} missed)" if h["missed"] else "")
        held_rows.append([
            label, held_n, fmt_us(h["memory"]["p50_us"]), fmt_us(h["memory"]["p99_us"]),
            fmt_us(h["committed"]["p50_us"]), fmt_us(h["committed"]["p99_us"]), fmt_x(h.get("committed_p50_vs_alone")),
            f"{k['to_last_release_s'] * 1000:,.0f} ms ({k['locks_released']:,})",
            f"{k['to_first_committed_s'] * 1000:,.0f} ms", f"{k['to_last_committed_s'] * 1000:,.0f} ms ({k['committed']:,})",
            str(k["overruns"]),
        ])
    state = table(["source", "sessions / locks", "attach all (first 1k → last 1k)", "CPU to attach", "RSS delta",
                      "open fds", "state file", "idle CPU"], state_rows)
    restart = table(["source", "restart: start() → return", "sessions / locks loaded", "vs start on an empty state",
                        "RSS added by start()", "once all stopped: start()", "sessions it loads"], restart_rows)
    held = table(["source", "n", "lock gone in memory p50", "p99", "`LockReleased` committed p50", "p99",
                     "committed p50 vs none held", "kill all → last lock gone in memory",
                     "→ first `LockReleased` committed", "→ last committed", "overruns"], held_rows)
    text = (f"A session per target (not the engine's child) with an auto lock on a directory of its own; the "
            f"target stamps CLOCK_MONOTONIC and exits. Lock gone in memory: the engine's observer hears "
            f"`exit_applied` (the lock is released in memory); committed: the transition listener, which runs after the "
            f"SQLite commit (WAL, synchronous=FULL). Baseline, one bare SQLite commit on the same disk: "
            f"p50 {fmt_us(floor['p50_us'])}, p99 {fmt_us(floor['p99_us'])}.\n\n{exits}\n\n"
            f"Where the time goes (medians of per-exit differences):\n\n{parts}\n\n"
            f"{n:,} idle processes attached one by one as sessions with a lock each: the engine process's RSS, "
            f"fds and CPU, its state file once closed, its CPU while idle:\n\n{state}\n\n"
            f"Restart: a new engine process on that state file with all {n:,} processes alive (start() to "
            f"return, against the first engine's start on an empty file); and once more after all of them "
            f"stopped (the kill below):\n\n{restart}\n\n"
            f"The restarted engine with all {n:,} held: exit → lock released for targets as above, then all "
            f"{n:,} SIGKILLed at once:\n\n{held}")
    if failures:
        text += "\n\nFailures:\n\n" + "\n".join(failures)
    return text

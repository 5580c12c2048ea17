"""Fork storm: two generators (bench/c/storm.c) fork and reap short-lived children as fast
as they can while 100 watched processes (bench/c/sleepers.c) exit at random times. Are all
100 seen, were events lost, what CPU does the listener burn per storm event, against a C
listener (exit-only mask, 16 MiB buffer) in the same storm; and in all-events mode, how
much of the storm it captures (matched by PID, with multiplicity: PIDs wrap).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import SOURCE_LABELS, Ctx, Helper, log, matched_with_multiplicity, read_pids, start_listener
from bench.stats import per_1k, ratio
from bench.table import fmt_num, fmt_x, table

TITLE = "Fork storm"


@dataclass(frozen=True)
class Sizes:
    storm_s: float  # how long the generators fork
    storm_watched: int  # processes watched through the storm


FULL = Sizes(storm_s=10.0, storm_watched=100)
QUICK = Sizes(storm_s=2.0, storm_watched=100)


def storm_methods(ctx: Ctx) -> list[str]:
    methods = ["netlink_native", "netlink_python", "nofilter_native", "nofilter_python", "pidfd", "all_native", "all_python"]
    return [m for m in methods if ctx.native or not m.endswith("native")]


def start_sleepers(ctx: Ctx) -> tuple[Helper, list[int]]:
    """The watched processes: children of their own helper, which reaps them."""
    seed = ctx.rng.randrange(1 << 30)
    argv = [ctx.bins["sleepers"], str(ctx.sizes.storm_watched), str(ctx.sizes.storm_s), str(seed)]
    helper = Helper("sleepers", argv)
    pids = [int(p) for p in helper.readline(30).split()]
    for pid in pids:  # so that they can be killed safely (no PID reuse) if we give up
        with contextlib.suppress(OSError):
            helper.kill_on_abandon.append(os.pidfd_open(pid))
    return helper, pids


def end_marker(ctx: Ctx, listener: Helper) -> None:
    """One last exit after the storm: once the listener has seen it, it has seen all before it.

    (Waiting for a quiet spell does not work in all-events mode: other processes on
    this host exit hundreds of times a second.)
    """
    marker = subprocess.Popen([ctx.bins["target"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        listener.send(f"S {marker.pid}")
        listener.expect("S", 30)
        marker.communicate(b"x", timeout=10)
    finally:
        if marker.returncode is None:
            marker.kill()
            marker.wait()


def storm_run(ctx: Ctx, method: str) -> dict[str, Any]:
    """One storm, with the C listener and the listener under test both listening to it."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"storm-{method}-", dir=ctx.tmp))
    c_dump, py_dump = run_dir / "c.pids", run_dir / "listener.pids"
    gen_files = [run_dir / f"gen{i}.pids" for i in range(2)]
    helpers: list[Helper] = []
    ok = False
    try:
        c_listener = start_listener(ctx, "storm", "c_listener", str(c_dump))
        helpers.append(c_listener)
        listener = start_listener(ctx, "storm", method, "--dump", str(py_dump))
        helpers.append(listener)
        sleepers, watched = start_sleepers(ctx)
        helpers.append(sleepers)
        listener.send("W " + " ".join(map(str, watched)))
        listener.expect("W", 30)
        gens = [Helper(f"storm generator {i}", [ctx.bins["storm"], str(ctx.sizes.storm_s), str(path)])
                for i, path in enumerate(gen_files)]
        helpers += gens
        for gen in gens:
            gen.expect("READY", 10)
        for helper in (*gens, sleepers):  # go: the storm and the watched processes' clocks start together
            helper.go()
        gen_done = [gen.expect("DONE", ctx.sizes.storm_s + 30) for gen in gens]
        sleepers.expect("DONE", 30)
        end_marker(ctx, listener)
        mine = json.loads(listener.expect_line("DONE", 120).split(" ", 1)[1])
        c_listener.proc.send_signal(signal.SIGTERM)
        c_done = c_listener.expect("DONE", 30)
        ok = True
    finally:
        for helper in reversed(helpers):
            helper.close(abandon=not ok)

    forks = sum(int(d[1]) for d in gen_done)
    events = 2 * forks  # one fork and one exit message per storm child
    generated = [pid for path in gen_files for pid in read_pids(path)]
    mine_ms = mine["cpu_us"] / 1000
    c_ms = (int(c_done[4]) - int(c_listener.ready[1])) / 1000
    c_captured = matched_with_multiplicity(generated, read_pids(c_dump))
    result: dict[str, Any] = {
        "forks": forks,
        "fork_rate_per_s": sum(int(d[1]) / (int(d[2]) / 1e9) for d in gen_done),
        "storm_events": events,
        "listener": {
            "decoder": mine["stats"].get("decoder"),
            "watched": mine["watched"], "watched_exits_seen": mine["watched_exits_seen"],
            "overruns": mine["overruns"], "cpu_ms": mine_ms,
            "cpu_ms_per_1k_events": per_1k(mine_ms, events), "cpu_ms_per_1k_forks": per_1k(mine_ms, forks),
            "stats": mine["stats"],
        },
        "c_listener": {
            "cpu_ms": c_ms, "cpu_ms_per_1k_events": per_1k(c_ms, events), "cpu_ms_per_1k_forks": per_1k(c_ms, forks),
            "exit_messages": int(c_done[2]), "enobufs": int(c_done[3]),
            "captured": c_captured, "capture_ratio": c_captured / forks if forks else None,
        },
        "cpu_ratio_vs_c": ratio(mine_ms, c_ms),
    }
    if method.startswith("all_"):
        captured = matched_with_multiplicity(generated, read_pids(py_dump))
        result["listener"]["captured"] = captured
        result["listener"]["capture_ratio"] = captured / forks if forks else None
    return result


def run(ctx: Ctx) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for method in [m for m in storm_methods(ctx) if ctx.wants(m)]:
        log(f"storm: {method}, {ctx.sizes.storm_s:g} s, {ctx.sizes.storm_watched} watched")
        runs[method] = storm_run(ctx, method)
    if not ctx.native:
        for method in ("netlink_native", "nofilter_native", "all_native"):
            runs[method] = {"status": "not built"}
    return {"duration_s": ctx.sizes.storm_s, "generators": 2, "watched": ctx.sizes.storm_watched,
            "netlink_types": ["exit"], "baseline": "c_listener (same storm, exit-only mask, 16 MiB)", "runs": runs}


def tables(res: dict[str, Any]) -> str:
    watched_rows: list[list[str]] = []
    all_rows: list[list[str]] = []
    for method, run in res["runs"].items():
        label = SOURCE_LABELS.get(method, method)
        if "listener" not in run:
            (all_rows if method.startswith("all_") else watched_rows).append([label, run.get("status", "–")] + ["–"] * 6)
            continue
        me, c = run["listener"], run["c_listener"]
        if method.startswith("all_"):
            all_rows.append([
                label, f"{run['fork_rate_per_s']:,.0f}", f"{me['captured']:,} / {run['forks']:,}",
                f"{me['capture_ratio']:.2%}", f"{c['capture_ratio']:.2%}", str(me["overruns"]),
                f"{fmt_num(me['cpu_ms_per_1k_events'], 2)} ms (C {fmt_num(c['cpu_ms_per_1k_events'], 2)})",
                fmt_x(run["cpu_ratio_vs_c"]),
            ])
        else:
            watched_rows.append([
                label, f"{run['fork_rate_per_s']:,.0f}", f"{me['watched_exits_seen']} / {me['watched']}",
                str(me["overruns"]), f"{fmt_num(me['cpu_ms_per_1k_events'], 2)} ms",
                f"{fmt_num(me['cpu_ms_per_1k_forks'], 2)} ms", f"{fmt_num(c['cpu_ms_per_1k_events'], 2)} ms",
                fmt_x(run["cpu_ratio_vs_c"]),
            ])
    watched = table(["listener", "storm forks/s", "watched exits seen", "overruns", "CPU / 1k storm events",
                        "CPU / 1k forks", "C listener CPU / 1k events", "CPU vs C"], watched_rows)
    everything = table(["listener", "storm forks/s", "storm exits captured", "capture ratio",
                           "C capture ratio", "overruns", "CPU / 1k storm events", "CPU vs C"], all_rows)
    return (f"Watching {res['watched']} processes during a {res['duration_s']:g} s storm of 2 fork generators "
            f"(a storm event = one fork or exit message = 2 per fork):\n\n{watched}\n\n"
            f"All-events mode (types=exit), capturing the generators' children, matched by PID with multiplicity:"
            f"\n\n{everything}")

"""Scale: 1,000 and 10,000 idle processes (bench/c/spawner.c) watched by one listener: the
time to watch them, its memory and file descriptors, and how fast all their exits arrive
when they are all SIGKILLed at once. Baseline: the pidfd source.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from typing import Any

from bench.harness import SOURCE_LABELS, BenchError, Ctx, Helper, log, start_listener
from bench.stats import ratio
from bench.table import fmt_x, table

TITLE = "Scale"


@dataclass(frozen=True)
class Sizes:
    scale_ns: tuple[int, ...]  # watched-process counts


FULL = Sizes(scale_ns=(1_000, 10_000))
QUICK = Sizes(scale_ns=(1_000,))


def scale_methods(ctx: Ctx) -> list[str]:
    return ["netlink_native", "netlink_python", "pidfd"] if ctx.native else ["netlink_python", "pidfd"]


def scale_run(ctx: Ctx, method: str, n: int) -> dict[str, Any]:
    """Spawn `n` idle processes, watch them all in one listener, then kill them all."""
    helpers: list[Helper] = []
    ok = False
    try:
        t0 = time.perf_counter()
        spawner = Helper("spawner", [ctx.bins["spawner"], str(n)], stop_signal=signal.SIGTERM)
        helpers.append(spawner)
        pids = []
        while (line := spawner.readline(120)) != "READY":
            pids.append(int(line))
        spawn_s = time.perf_counter() - t0
        pid_file = ctx.tmp / f"scale-{method}-{n}.pids"
        pid_file.write_text("\n".join(map(str, pids)))
        listener = start_listener(ctx, "scale", method)
        helpers.append(listener)
        listener.send(f"F {pid_file}")
        watched = json.loads(listener.expect_line("W ", 60 + n / 100).split(" ", 1)[1])
        t_kill = time.monotonic_ns()
        spawner.proc.send_signal(signal.SIGTERM)  # it SIGKILLs all n and reaps them
        x = listener.expect("X", 120)
        spawner.expect("DONE", 120)
        ok = True
    finally:
        for helper in reversed(helpers):
            helper.close(abandon=not ok)
    rss_delta = watched["rss_kib_after"] - watched["rss_kib_before"]
    return {
        "n": watched["n"], "watched": watched["watched"], "spawn_s": spawn_s,
        "watch_s": watched["watch_s"], "keys_s": watched["keys_s"],
        "watch_us_per_process": watched["watch_s"] / n * 1e6,
        "rss_delta_kib": rss_delta, "rss_bytes_per_watch": rss_delta * 1024 / n,
        "fds_delta": watched["fds_after"] - watched["fds_before"], "fds_after": watched["fds_after"],
        "nofile_limit": watched["nofile_limit"], "cpu_ms_to_watch": watched["cpu_us"] / 1000,
        "exit_burst_s": (int(x[1]) - t_kill) / 1e9, "exit_burst_overruns": int(x[2]),
    }


def run(ctx: Ctx) -> dict[str, Any]:
    by_n: dict[str, dict[str, Any]] = {}
    for n in ctx.sizes.scale_ns:
        runs: dict[str, Any] = {}
        for method in ("netlink_native", "netlink_python", "pidfd"):
            if method == "netlink_native" and not ctx.native:
                runs[method] = {"status": "not built"}
                continue
            log(f"scale: {method}, {n} processes")
            try:
                runs[method] = scale_run(ctx, method, n)
            except BenchError as err:  # one source failing at this size still leaves the others' numbers
                log(f"scale: {method} at {n} failed: {err}")
                runs[method] = {"status": "failed", "error": str(err)}
        base = runs["pidfd"]
        for run in runs.values():
            if "n" in run:
                run["rss_vs_pidfd"] = ratio(run["rss_delta_kib"], base.get("rss_delta_kib"))
                run["watch_time_vs_pidfd"] = ratio(run["watch_s"], base.get("watch_s"))
        by_n[str(n)] = runs
    return {"sizes": list(ctx.sizes.scale_ns), "baseline": "pidfd", "runs": by_n}


def tables(res: dict[str, Any]) -> str:
    rows, failures = [], []
    for n, runs in res["runs"].items():
        for method, run in runs.items():
            label = SOURCE_LABELS.get(method, method)
            if "n" not in run:
                rows.append([label, f"{int(n):,}", run.get("status", "–")] + ["–"] * 7)
                if "error" in run:
                    failures.append(f"- {label}, {int(n):,} processes: {run['error']}")
                continue
            rows.append([
                label, f"{run['watched']:,}",
                f"{run['watch_s'] * 1000:,.0f} ms ({run['watch_us_per_process']:.0f} µs each)",
                f"{run['keys_s'] * 1000:,.0f} ms",
                f"{run['rss_delta_kib'] / 1024:.1f} MiB ({run['rss_bytes_per_watch']:,.0f} B each)",
                fmt_x(run["rss_vs_pidfd"]), f"+{run['fds_delta']:,}", f"{run['cpu_ms_to_watch']:,.0f} ms",
                f"{run['exit_burst_s'] * 1000:,.0f} ms", str(run["exit_burst_overruns"]),
            ])
    runs = table(["source", "watched", "time to watch", "+ ProcessKey.of for all", "RSS delta", "RSS vs pidfd",
                      "open fds", "CPU to watch", "kill all → last Exited", "overruns"], rows)
    text = ("Idle processes watched by one listener process (its RSS and fd count before and after); then all "
            f"of them are SIGKILLed at once:\n\n{runs}")
    if failures:
        text += "\n\nFailures:\n\n" + "\n".join(failures)
    return text

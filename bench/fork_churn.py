"""Fork churn: a real daemon and one attached `tree` session whose process (bench/c/churner.c)
does 10,000 fork+exit pairs (--quick: 2,000), 0.5 ms apart, a thousand at a time: the
daemon's CPU per 1,000 pairs for the first and the last thousand and their ratio (a session
with 10,000 children must cost per fork what it did with none), against the same churn with
no session.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import BenchError, Ctx, DaemonProcess, Helper, log, proc_cpu_s, proc_rss_kib
from bench.stats import median, ratio
from bench.table import fmt_num, fmt_x, table

TITLE = "Fork churn (one tree session, 10,000 fork+exit pairs: daemon CPU per 1,000, first vs last)"


@dataclass(frozen=True)
class Sizes:
    churn_pairs: int  # fork+exit pairs of the one tree session, in thousands
    churn_baseline_pairs: int  # the same churn with no session


FULL = Sizes(churn_pairs=10_000, churn_baseline_pairs=3_000)
QUICK = Sizes(churn_pairs=2_000, churn_baseline_pairs=1_000)

# A pause after each pair, as a busy build or agent forks: each event then tends to be a
# commit of its own (in a tight loop they arrive in bursts that one group commit takes).
CHURN_PAUSE_US = 500



def churn_thousand(daemon: DaemonProcess, churner: Helper, pairs: int, session_id: str | None, exited_before: int) -> dict[str, Any]:
    """`pairs` fork+exit pairs, timed from the command to the daemon having stored every one
    (its session's count of exited children; with no session, the churn's own end)."""
    cpu0, wall0 = proc_cpu_s(daemon.pid), time.monotonic()
    churner.send(f"{pairs} {CHURN_PAUSE_US}")
    churner.expect("DONE", 300)
    churn_wall = time.monotonic() - wall0
    if session_id is not None:
        deadline = time.monotonic() + 120
        while daemon.call("session.get", id=session_id)["child_summary"]["exited"] < exited_before + pairs:
            if time.monotonic() > deadline:
                raise BenchError("the daemon did not account for every child within 120 s")
            time.sleep(0.02)
    return {"cpu_ms": round((proc_cpu_s(daemon.pid) - cpu0) * 1000, 1), "churn_wall_ms": round(churn_wall * 1000, 1),
            "wall_ms": round((time.monotonic() - wall0) * 1000, 1)}


def run(ctx: Ctx) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="churn-", dir=ctx.tmp))
    config = work / "config.toml"
    config.write_text("")
    helpers: list[Any] = []
    ok = False
    step = 1000
    try:
        daemon = DaemonProcess(sys.executable, work / "run" / "monitor.sock", work / "state", config, work / "daemon.log")
        helpers.append(daemon)
        hello = daemon.wait_ready(60)
        churner = Helper("churner", [ctx.bins["churner"]])
        helpers.append(churner)
        churner.expect("READY", 10)
        log(f"fork churn: {ctx.sizes.churn_baseline_pairs} pairs with no session")
        baseline = [churn_thousand(daemon, churner, step, None, 0) for _ in range(ctx.sizes.churn_baseline_pairs // step)]
        session = daemon.call("session.attach", pid=churner.proc.pid, policy="tree", lock=False)
        log(f"fork churn: {ctx.sizes.churn_pairs} pairs in one tree session")
        thousands = []
        for i in range(ctx.sizes.churn_pairs // step):
            thousands.append(churn_thousand(daemon, churner, step, session["id"], i * step))
        summary = daemon.call("session.get", id=session["id"])["child_summary"]
        rss = proc_rss_kib(daemon.pid)
        churner.close()
        helpers.remove(churner)
        ok = True
    finally:
        for helper in reversed(helpers):
            helper.close(abandon=not ok)
    first, last = thousands[0]["cpu_ms"], thousands[-1]["cpu_ms"]
    return {"source": hello.get("source"), "pairs": ctx.sizes.churn_pairs, "per": step, "pause_us": CHURN_PAUSE_US,
            "baseline": {"thousands": baseline, "median_cpu_ms": median([b["cpu_ms"] for b in baseline])},
            "session": {"thousands": thousands, "first_cpu_ms": first, "last_cpu_ms": last, "last_over_first": ratio(last, first),
                        "median_cpu_ms": median([t["cpu_ms"] for t in thousands]), "child_summary": summary,
                        "daemon_rss_kib_at_end": rss},
            "target_last_over_first": 1.2}


def tables(res: dict[str, Any]) -> str:
    s, b = res["session"], res["baseline"]
    rows = [["no session (baseline)", fmt_num(b["median_cpu_ms"]), "-", "-",
             fmt_num(median([t["churn_wall_ms"] for t in b["thousands"]]))],
            ["one tree session", fmt_num(s["first_cpu_ms"]), fmt_num(s["last_cpu_ms"]), fmt_x(s["last_over_first"]),
             fmt_num(median([t["churn_wall_ms"] for t in s["thousands"]]))]]
    text = table(["churn", "daemon CPU ms / 1,000 pairs (first)", "last", "last / first (target <= 1.2)",
                     "churn wall ms / 1,000 (median)"], rows)
    per = ", ".join(fmt_num(t["cpu_ms"]) for t in s["thousands"])
    return (text + f"\n\nSource {res['source']}; {res['pairs']:,} pairs, {res['pause_us']} µs apart. Daemon CPU ms per 1,000 pairs, in order: {per}. "
            f"The session at the end: {s['child_summary']}; daemon RSS {s['daemon_rss_kib_at_end']:,} KiB.")

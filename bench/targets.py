"""The project's targets, read out of one or more runs' results: each ratio, its median over
the runs, whether that meets the goal, and beside it the floor measured in the same runs,
what the same kind of consumer reaches with none of monitor's code (a goal below its floor
cannot be met by monitor's code, only by a different kind of consumer):

    python -m bench.targets RUN.json [RUN.json ...]

`scripts/bench` prints this table for its own run too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import median
from bench.table import fmt_x, table

Results = dict[str, Any]
Read = Callable[[Results], float | None]


def latency(method: str, field: str = "ratio_p50") -> Read:
    def read(results: Results) -> float | None:
        value = results.get("latency", {}).get("methods", {}).get(method, {}).get(field)
        return None if value is None else float(value)
    return read


def storm(run: str, field: str) -> Read:
    def read(results: Results) -> float | None:
        found = results.get("storm", {}).get("runs", {}).get(run)
        if not found or "error" in found:
            return None
        if field == "lost":  # exits of the storm's children that the listener never reported
            return float(found["forks"] - found["listener"]["captured"])
        return float(found[field])
    return read


def notify(measure: str) -> Read:
    def read(results: Results) -> float | None:
        value = results.get("notify", {}).get("measures", {}).get(measure, {}).get("ratio_p50")
        return None if value is None else float(value)
    return read


def churn(results: Results) -> float | None:
    value = results.get("fork_churn", {}).get("session", {}).get("last_over_first")
    return None if value is None else float(value)


@dataclass(frozen=True)
class Target:
    what: str
    goal: float  # met when the measure is at most this
    measure: Read
    floor: Read | None = None  # the same kind of consumer with no monitor code, in the same run
    count: bool = False  # a count (events lost), not a ratio


ASYNC_FOR = latency("py_asyncio_minimal")
CALLBACK = latency("py_asyncio_minimal_cb")
TARGETS = (
    Target("`monitor events --json --type exit` p50 (the line read)", 1.25, latency("cli_events"),
           latency("py_asyncio_minimal_cb", "read_ratio_p50")),
    Target("`monitor events --json --type exit` p99 (the line read)", 1.5, latency("cli_events", "ratio_p99"),
           latency("py_asyncio_minimal_cb", "read_ratio_p99")),
    Target("listener callback p50, native decoder", 1.2, latency("netlink_native_cb"), CALLBACK),
    Target("listener callback p50, python decoder", 1.2, latency("netlink_python_cb"), CALLBACK),
    Target("`async for` p50, native decoder", 1.2, latency("netlink_native"), ASYNC_FOR),
    Target("`async for` p50, python decoder", 1.2, latency("netlink_python"), ASYNC_FOR),
    Target("pidfd callback p50", 1.3, latency("pidfd_cb"), CALLBACK),
    Target("pidfd `async for` p50", 1.3, latency("pidfd"), ASYNC_FOR),
    Target("`monitor wait` p50, against the C listener as idle", 1.25, latency("cli_wait"),
           latency("py_asyncio_minimal_idle_cb", "read_ratio_p50")),
    Target("storm, all-events mode, CPU per event vs C (native)", 1.5, storm("all_native", "cpu_ratio_vs_c")),
    Target("storm, all-events mode, CPU per event vs C (python)", 1.5, storm("all_python", "cpu_ratio_vs_c")),
    Target("storm, all-events mode, exits lost (native)", 0, storm("all_native", "lost"), count=True),
    Target("storm, all-events mode, exits lost (python)", 0, storm("all_python", "lost"), count=True),
    Target("daemon: exit → subscriber line p50, against pidfd wait + commit + line", 1.5, notify("subscriber"),
           notify("mini_daemon")),
    Target("fork churn: daemon CPU per 1,000 forks, last vs first", 1.2, churn),
)


def summary(runs: list[Results]) -> str:
    """The targets found in `runs` (those a run measured), as one markdown table; "" if none."""
    rows = []
    for t in TARGETS:
        values = [t.measure(r) for r in runs]
        if all(v is None for v in values):
            continue
        mid = median(v for v in values if v is not None)
        floor = median(f for f in (t.floor(r) if t.floor else None for r in runs) if f is not None)
        shown = (lambda v: "–" if v is None else f"{v:,.0f}") if t.count else fmt_x
        met = "–" if mid is None else ("✔" if mid <= t.goal else "✘")
        each = [shown(v) for v in values] if len(runs) > 1 else []
        rows.append([t.what, f"≤ {t.goal:g}" if t.count else f"≤ {t.goal:.2f}×", *each, shown(mid), met, fmt_x(floor)])
    if not rows:
        return ""
    heads = [f"run {i + 1}" for i in range(len(runs))] + ["median"] if len(runs) > 1 else ["measured"]
    return table(["target", "goal", *heads, "met", "floor: no monitor code, same runs"], rows)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench.targets RUN.json [RUN.json ...]", file=sys.stderr)
        return 2
    print(summary([json.loads(Path(p).read_text()) for p in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

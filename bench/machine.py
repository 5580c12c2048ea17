"""What this machine charges every event path after a quiet spell, measured in the same run
as the rest (bench/c/machine.c): the first touch of memory again (per 4 KiB page, and inside
2 MiB pages), waking a process blocked on another CPU, and the one line `monitor wait --json`
formats for an exit, in this Python process.

A listener is idle between exits. When a vCPU halts, the host may run something else on
it and come back to an empty TLB: then each distinct 4 KiB page touched costs a page walk
(a few µs here) whatever it holds. A C listener touches a few pages per event; a Python
path (the interpreter's code, the objects and code objects of every function on it)
hundreds. That, not the CPU work, is what grows the ratios of the Python paths at idle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from bench.harness import Ctx, Helper, log
from bench.stats import median, ratio
from bench.table import fmt_num, fmt_us, fmt_x, table

TITLE = "The machine (what a quiet spell costs an event path: memory touched again, a wake-up on another CPU)"

PAGES = 256  # per touch (bench/c/machine.c)
IDLE_MS = (0, 5, 50)  # 5 ms: about the latency benchmark's gap between exits; 50 ms: `monitor wait`'s


@dataclass(frozen=True)
class Sizes:
    touch_trials: int  # per idle time
    wake_trials: int  # per placement
    format_trials: int  # per idle time


FULL = Sizes(touch_trials=21, wake_trials=201, format_trials=21)
QUICK = Sizes(touch_trials=3, wake_trials=11, format_trials=3)


def lines_of(ctx: Ctx, name: str, *args: object, count: int) -> list[list[int]]:
    """The numbers on each of `count` lines of bench/c/machine.c run with `args`."""
    helper = Helper(name, [ctx.bins["machine"], *map(str, args)])
    try:
        return [[int(w) for w in helper.readline(60).split()[1:]] for _ in range(count)]
    finally:
        helper.close()


def exit_line_us(idle_ms: int, trials: int) -> float | None:
    """Median µs to format one exit as `monitor wait --json` prints it, after `idle_ms` of sleep."""
    from monitor.cli import event_json
    from monitor.events import Exited
    from monitor.identity import ProcessKey

    key = ProcessKey.of(1)
    spent = []
    for _ in range(trials):
        time.sleep(idle_ms / 1000)
        t0 = time.perf_counter_ns()
        json.dumps(event_json(Exited.from_wait_status(key, 9, "netlink", 1, 2)))
        spent.append((time.perf_counter_ns() - t0) / 1000)
    return median(spent)


def run(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    touch: dict[str, Any] = {}
    for idle in IDLE_MS:
        log(f"machine: touch after {idle} ms x{s.touch_trials}")
        rows = lines_of(ctx, "page touch", "touch", idle, s.touch_trials, count=s.touch_trials)
        touch[str(idle)] = {
            "first_us": median(r[0] / 1000 for r in rows), "again_us": median(r[1] / 1000 for r in rows),
            "huge_us": median(r[2] / 1000 for r in rows), "huge_kib": rows[-1][3],
        }
    wake: dict[str, Any] = {}
    for placement, same in (("other_cpu", 0), ("same_cpu", 1)):
        log(f"machine: wake-up on the {placement} x{s.wake_trials}")
        rows = lines_of(ctx, "wake-up", "wake", same, s.wake_trials, count=s.wake_trials)
        wake[placement] = {"write_us": median(r[0] / 1000 for r in rows), "woken_us": median(r[1] / 1000 for r in rows)}
    formatting = {str(idle): exit_line_us(idle, s.format_trials) for idle in IDLE_MS}
    return {"pages": PAGES, "touch": touch, "wake": wake, "exit_line_us": formatting}


def tables(res: dict[str, Any]) -> str:
    pages = res["pages"]
    touch, line = res["touch"], res["exit_line_us"]
    rows = []
    for idle in map(str, IDLE_MS):
        t = touch[idle]
        rows.append([f"{idle} ms", fmt_us(t["first_us"]), fmt_num(t["first_us"] / pages, 2), fmt_us(t["again_us"]),
                     fmt_us(t["huge_us"]), fmt_x(ratio(t["first_us"], t["huge_us"])), fmt_us(line[idle]),
                     fmt_x(ratio(line[idle], line["0"]))])
    text = table(["quiet before", f"first touch of {pages} 4 KiB pages (C)", "µs per page", "the same again",
                  f"{pages} pages inside 2 MiB pages", "4 KiB vs 2 MiB", "one exit as `monitor wait --json` formats it (Python)",
                  "that vs no quiet"], rows)
    huge_kib = touch["0"]["huge_kib"]
    wake = res["wake"]
    rows = [[label, fmt_us(wake[k]["write_us"]), fmt_us(wake[k]["woken_us"])]
            for k, label in (("other_cpu", "blocked on the other CPU"), ("same_cpu", "blocked on this CPU"))]
    text += ("\n\n" + table(["a process blocked in read(2), 5 ms after it slept", "our write(2) takes", "it runs, after our write began"], rows)
             + f"\n\nThe 2 MiB pages are transparent huge pages (madvise; {huge_kib:,} KiB of them were in place). "
             "Medians. The first touch after a quiet spell costs per 4 KiB page, not per byte: a C listener touches a "
             "few pages per event, a Python path hundreds, so the ratios of the Python paths grow with the quiet "
             "before each exit (the latency benchmark leaves a few ms between exits, `monitor wait` 50 ms). "
             "Waking a process on the other CPU costs the waker too (an interprocessor interrupt through the host).")
    return text

"""A source under test in a process of its own, so its CPU and memory are its alone:

    python -m bench.listener latency|storm|scale METHOD [--dump PATH]

METHOD is a source by its results' name (bench/baselines.py: make_source); a `_cb` suffix
takes each event through the source's listener callback instead of `async for`. The
harness talks to it in lines: see each mode's docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import struct
import sys
import time
from pathlib import Path
from typing import Any

from bench.baselines import make_source
from bench.harness import cpu_us, open_fds, rss_kib
from bench.lines import StdinLines, say
from monitor.tasks import cancel


def report_exits_by_callback(source: Any, method: str) -> None:
    """For the `_cb` methods: the consumer runs inside the source's own reader callback
    (set_listener), and says "E pid t_consumer_ns kernel_ts_ns observed_ns" or "O"."""
    from monitor.events import Exited, Overrun

    if not method.endswith("_cb") and method != "py_thread_minimal":
        return

    def on_event(event: Any) -> None:
        t = time.monotonic_ns()
        if isinstance(event, Exited):
            say(f"E {event.key.pid} {t} {event.kernel_ts_ns or 0} {event.observed_ns or 0}")
        elif isinstance(event, Overrun):
            say("O")

    source.set_listener(on_event)


async def latency_role(method: str) -> None:
    """Watch each PID the harness names; stamp each `Exited` as the consumer gets it.

    Protocol: "W pid" -> watch, answer "W pid"; on the exit, "E pid t_consumer_ns
    kernel_ts_ns observed_ns" (0 when unknown); "O" for an Overrun; EOF ends.
    """
    from monitor.events import Exited, Overrun
    from monitor.identity import ProcessKey

    async with make_source(method) as source:
        def on_line(line: str) -> None:
            pid = int(line.split()[1])
            source.watch(ProcessKey.of(pid))
            say(f"W {pid}")

        loop = asyncio.get_running_loop()
        StdinLines(on_line, lambda: loop.create_task(source.close()))
        report_exits_by_callback(source, method)
        say("READY")
        async for event in source:
            t = time.monotonic_ns()  # the measurement: right after `async for` yields
            if isinstance(event, Exited):
                say(f"E {event.key.pid} {t} {event.kernel_ts_ns or 0} {event.observed_ns or 0}")
            elif isinstance(event, Overrun):
                say("O")


async def storm_role(method: str, dump: str | None) -> None:
    """Count the watched exits, Overruns and CPU through a storm.

    Protocol: "W pid pid ..." -> watch them all, answer "W n"; "S pid" -> watch that
    marker process, answer "S"; the harness then ends the marker, and its `Exited`,
    queued behind every storm event, means the backlog is drained: answer
    "DONE {json}". In all-events mode every other `Exited` PID is written to `dump`
    (int32) for the harness to match against the generators' PIDs.
    """
    from monitor.events import Exited, Overrun
    from monitor.identity import ProcessKey

    watched: set[int] = set()
    seen: set[int] = set()
    passing: list[int] = []
    state: dict[str, Any] = {"overruns": 0, "cpu0": 0, "marker": None}
    drained = asyncio.Event()

    async with make_source(method) as source:
        def on_line(line: str) -> None:
            words = line.split()
            if words[0] == "W":
                pids = [int(w) for w in words[1:]]
                watched.update(pids)
                for pid in pids:
                    source.watch(ProcessKey.of(pid))
                state["cpu0"] = cpu_us()  # the storm's CPU window starts here
                say(f"W {len(pids)}")
            elif words[0] == "S":
                state["marker"] = ProcessKey.of(int(words[1]))
                source.watch(state["marker"])
                say("S")

        async def consume() -> None:
            async for event in source:
                if isinstance(event, Exited):
                    if event.key == state["marker"]:
                        drained.set()
                    elif event.key.pid in watched and event.key.start_time_ticks is not None:
                        seen.add(event.key.pid)
                    else:
                        passing.append(event.key.pid)
                elif isinstance(event, Overrun):
                    state["overruns"] += 1

        StdinLines(on_line, drained.set)
        consumer = asyncio.get_running_loop().create_task(consume())
        say("READY")
        await drained.wait()
        cpu = cpu_us() - state["cpu0"]
        stats = source.stats()
        await cancel(consumer)
    if dump:
        Path(dump).write_bytes(struct.pack(f"={len(passing)}i", *passing))
    say("DONE " + json.dumps({"watched": len(watched), "watched_exits_seen": len(seen & watched),
                              "overruns": state["overruns"], "cpu_us": cpu, "passing_exits": len(passing),
                              "stats": stats}))


async def scale_role(method: str) -> None:
    """Watch every PID in a file; report time, RSS and fds; then count the exits.

    Protocol: "READY" after start; "F path" -> watch them all, answer "W {json}";
    then "X last_exit_ns overruns" once all have exited; EOF ends.
    """
    from monitor.events import Exited, Overrun
    from monitor.identity import ProcessKey

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a pidfd per watch
    state = {"expected": -1, "exits": 0, "overruns": 0}

    async with make_source(method) as source:
        base = {"rss_kib": rss_kib(), "fds": open_fds(), "cpu_us": cpu_us()}

        def on_line(line: str) -> None:
            pids = [int(p) for p in Path(line.split(maxsplit=1)[1]).read_text().split()]
            t0 = time.perf_counter()
            keys = [ProcessKey.of(pid) for pid in pids]
            t1 = time.perf_counter()
            for i, key in enumerate(keys):
                try:
                    source.watch(key)
                except Exception as err:
                    raise RuntimeError(f"watch() failed after {i} of {len(keys)} watches "
                                       f"({open_fds()} fds open): {type(err).__name__}: {err}") from err
            t2 = time.perf_counter()
            state["expected"] = len(pids)
            say("W " + json.dumps({
                "n": len(pids), "keys_s": t1 - t0, "watch_s": t2 - t1,
                "rss_kib_before": base["rss_kib"], "rss_kib_after": rss_kib(),
                "fds_before": base["fds"], "fds_after": open_fds(), "nofile_limit": hard,
                "cpu_us": cpu_us() - base["cpu_us"], "watched": source.stats().get("watched"),
            }))

        loop = asyncio.get_running_loop()
        StdinLines(on_line, lambda: loop.create_task(source.close()))
        report_exits_by_callback(source, method)
        say("READY")
        async for event in source:
            if isinstance(event, Exited):
                state["exits"] += 1
                if state["exits"] == state["expected"]:
                    say(f"X {time.monotonic_ns()} {state['overruns']}")
            elif isinstance(event, Overrun):
                state["overruns"] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("latency", "storm", "scale"))
    parser.add_argument("method")
    parser.add_argument("--dump", help="storm, all-events mode: where the passing exits' PIDs go (int32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # overrun warnings would flood the terminal
    modes = {"latency": lambda: latency_role(args.method), "storm": lambda: storm_role(args.method, args.dump),
             "scale": lambda: scale_role(args.method)}
    asyncio.run(modes[args.mode]())
    return 0


if __name__ == "__main__":
    sys.exit(main())

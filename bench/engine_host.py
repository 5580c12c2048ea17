"""An Engine in a process of its own (bench/engine.py's subject):

    python -m bench.engine_host METHOD STATE_PATH

METHOD is the engine's source (netlink_native, netlink_python, pidfd). The harness talks
to it in lines (see `serve`). It stamps each exit through the engine's own hooks: its
`Observer` (`exit_applied`: the engine's memory took in the exit, its locks are free) and
its transition listener (the commit is done).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import cpu_us, open_fds, rss_kib
from bench.lines import StdinLines, say
from monitor.engine import Engine
from monitor.events import Exited, LockReleased, SessionStopped
from monitor.identity import ProcessKey

ENGINE_SOURCES: dict[str, tuple[str, dict[str, Any]]] = {
    "netlink_native": ("netlink", {"decoder": "native"}),
    "netlink_python": ("netlink", {"decoder": "python"}),
    "pidfd": ("pidfd", {}),
}


class Stamps:
    """The engine's Observer: when each exit reached the engine's memory. The "A" sessions'
    exits are stamped per key (`probes`); the others are counted in `bulk`."""

    def __init__(self) -> None:
        self.probes: dict[ProcessKey, dict[str, int]] = {}  # the "A" sessions' stamps, by their key
        self.bulk = {"expected": 0, "memory": 0, "committed": 0, "stopped": 0,
                     "first_memory_ns": 0, "last_memory_ns": 0, "first_committed_ns": 0, "last_committed_ns": 0}

    def exit_applied(self, event: Exited, released: int) -> None:
        now = time.monotonic_ns()
        stamps = self.probes.get(event.key)
        if stamps is not None:
            stamps.update(observed=event.observed_ns or 0, kernel=event.kernel_ts_ns or 0)
            if released:
                stamps["memory"] = now
        elif released:
            self.bulk["memory"] += released
            self.bulk["first_memory_ns"] = self.bulk["first_memory_ns"] or now
            self.bulk["last_memory_ns"] = now

    def exit_to_stop(self, seconds: float) -> None:
        pass

    def hook_run(self, hook: str, outcome: str) -> None:
        pass


async def serve(method: str, state_path: str) -> None:
    """An Engine on `state_path`, attaching what the harness names and stamping each release.

    Two moments are stamped per exit: the in-memory one (the observer's `exit_applied`:
    the lock is gone, anyone asking now sees the directory free) and the durable one (the
    transition listener, which runs after the commit). `Exited.observed_ns` (the source
    emitted it) comes with the event the observer is handed.

    Protocol: "READY {json}" once start() returned (it is timed: with a state file that
    holds sessions, that is a restart's reconcile). "A pid dir" -> attach pid as a session
    with an auto lock on dir, answer "A pid"; on its exit "R pid observed_ns kernel_ts_ns
    memory_ns lock_committed_ns stop_committed_ns" (0 when unknown). "F path" -> attach
    every "pid dir" line of the file, in order, answer "F {json}". "I s" -> idle CPU over
    s seconds, answer "I {json}". "K n" -> count the releases of sessions not attached with
    "A" (the harness then kills them), answer "K", and "X {json}" once n are committed.
    "C" -> close the engine, answer "C {json}". EOF closes it (if still open) and ends.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a pidfd per watched process
    loop = asyncio.get_running_loop()
    source, options = ENGINE_SOURCES[method]
    stamps = Stamps()
    engine = Engine(state_path, source=source, source_options=options, observer=stamps)
    probes, bulk = stamps.probes, stamps.bulk
    probe_ids: dict[str, ProcessKey] = {}  # session id -> key, for SessionStopped
    tasks: set[asyncio.Task[None]] = set()
    finished = asyncio.Event()

    def on_transition(transition: Any) -> None:
        now = time.monotonic_ns()
        if isinstance(transition, LockReleased) and transition.owner is not None:
            if transition.owner in probes:
                probes[transition.owner]["lock"] = now
            else:
                bulk["committed"] += 1
                bulk["first_committed_ns"] = bulk["first_committed_ns"] or now
                bulk["last_committed_ns"] = now
        elif isinstance(transition, SessionStopped):
            key = probe_ids.pop(transition.session_id, None)
            if key is None:
                bulk["stopped"] += 1
            else:
                s = probes.pop(key)
                say(f"R {key.pid} {s.get('observed', 0)} {s.get('kernel', 0)} {s.get('memory', 0)} {s.get('lock', 0)} {now}")
        if bulk["expected"] and bulk["committed"] >= bulk["expected"] and bulk["stopped"] >= bulk["expected"]:
            bulk["expected"] = 0
            say("X " + json.dumps({**bulk, "stats": engine.source.stats() if engine.source else {}}))

    engine.add_listener(on_transition)

    def spawn(coro: Any) -> None:
        """Run a command's coroutine; its failure is told to the harness, not lost."""
        async def guarded() -> None:
            try:
                await coro
            except Exception as err:
                say(f"ERR {type(err).__name__}: {err}")

        task = loop.create_task(guarded())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def attach_one(pid: int, directory: str) -> None:
        session = await engine.attach(pid, cwd=directory, argv=["target"], lock=True)
        probes[session.key] = {}
        probe_ids[session.id] = session.key
        say(f"A {pid}")

    async def attach_file(path: str) -> None:
        jobs = [line.split(maxsplit=1) for line in Path(path).read_text().splitlines()]
        before = {"rss_kib": rss_kib(), "fds": open_fds(), "cpu_us": cpu_us()}
        chunk_us: list[float] = []  # µs per attach, per 1,000 sessions: grows if attach is O(sessions)
        t0 = t_chunk = time.perf_counter()
        for i, (pid, directory) in enumerate(jobs, start=1):
            await engine.attach(int(pid), cwd=directory, argv=["spawner-child"], lock=True)
            if i % 1000 == 0 or i == len(jobs):
                now = time.perf_counter()
                chunk_us.append((now - t_chunk) / (i - 1000 * len(chunk_us)) * 1e6)
                t_chunk = now
        attach_s = time.perf_counter() - t0
        await engine.flush()
        say("F " + json.dumps({
            "n": len(jobs), "attach_s": attach_s, "attach_chunk_us": chunk_us, "cpu_us": cpu_us() - before["cpu_us"],
            "rss_kib_before": before["rss_kib"], "rss_kib_after": rss_kib(),
            "fds_before": before["fds"], "fds_after": open_fds(),
            "sessions": len(engine.sessions()), "locks": len(engine.locks.locks), "nofile_limit": hard,
        }))

    async def idle(seconds: float) -> None:
        cpu0, t0 = cpu_us(), time.perf_counter()
        await asyncio.sleep(seconds)
        say("I " + json.dumps({"cpu_us": cpu_us() - cpu0, "wall_s": time.perf_counter() - t0}))

    async def close() -> None:
        t0 = time.perf_counter()
        await engine.close()
        say("C " + json.dumps({"close_s": time.perf_counter() - t0}))

    closing: list[asyncio.Task[None]] = []

    def on_line(line: str) -> None:
        words = line.split()
        if words[0] == "A":
            spawn(attach_one(int(words[1]), words[2]))
        elif words[0] == "F":
            spawn(attach_file(words[1]))
        elif words[0] == "I":
            spawn(idle(float(words[1])))
        elif words[0] == "K":
            bulk.update(dict.fromkeys(bulk, 0), expected=int(words[1]))  # counting starts now
            say("K")
        elif words[0] == "C":
            closing.append(loop.create_task(close()))

    rss_before, fds_before = rss_kib(), open_fds()
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    StdinLines(on_line, finished.set)
    say("READY " + json.dumps({
        "start_s": start_s, "rss_kib_before": rss_before, "rss_kib_after": rss_kib(),
        "fds_before": fds_before, "fds_after": open_fds(), "sessions": len(engine.sessions()),
        "sessions_in_memory": len(engine.tracker.sessions),  # stopped ones too
        "locks": len(engine.locks.locks), "stats": engine.source.stats() if engine.source else {},
    }))
    await finished.wait()
    for task in list(tasks):
        task.cancel()
    if closing:
        await closing[0]
    else:
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("method", choices=sorted(ENGINE_SOURCES))
    parser.add_argument("state_path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(serve(args.method, args.state_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

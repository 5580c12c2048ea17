#!/usr/bin/env python3
"""Benchmarks of monitor's event sources against baselines measured in the same run.

    scripts/bench [--quick] [--only latency,storm,scale,engine,daemon,notify,fleet] [--out bench-results/latest.json]

Seven benchmarks, each reported as ratios against a baseline from this very run
(this VM is noisy, so absolute numbers from another run are not comparable):

latency  exit -> `Exited` in the Python consumer, p50/p99, for netlink (python and
         native decoder), pidfd and polling, against a minimal C proc-connector
         listener (the floor). Targets are NOT children of the listener.
storm    two fork-storm generators plus 100 watched processes that exit during the
         storm: are all 100 seen, were events lost, what CPU does the listener burn
         per event, and how much of the storm the all-events mode captures.
scale    memory, file descriptors and time to watch 1,000 and 10,000 processes
         (--quick: 1,000), and how fast all their exits arrive when they all die.
engine   the whole Engine (source, tracker, locks, SQLite): exit -> auto lock gone in
         memory and -> `LockReleased` committed and delivered, p50/p99, against one
         bare SQLite commit; then 10,000 sessions with locks (--quick: 1,000): memory,
         state file size, idle CPU, a restart's reconcile time (against a start on an
         empty state file), exits with them all held, and all of them exiting at once.
daemon   a real `monitor daemon` on a temporary socket and state dir: `hello` round trips
         (1 client, then 10 concurrent client processes) against a minimal asyncio
         echo server; lock acquire/release with 1 and 10 clients against bare SQLite
         commits/s; `monitor launch --wait -- true` against `sh -c true` and against
         the CLI's own start-up (`monitor --version`).
notify   a real daemon (netlink) with a webhook endpoint: SIGKILL of an attached process ->
         `session.stopped` webhook received, and -> subscriber line read, p50/p99, against
         this process's own pidfd wait + an httpcore POST / a socketpair line; the
         subscriber again with another subscriber stalled (cut off at the end); bursts.
fleet    a real daemon publishing to a real nats-server -js: exit -> `session.stopped` read
         from a JetStream consumer, against a bare nats-py publish-and-consume of the same
         size; a burst of stops until the last is in the stream (scripts/bench_fleet.py).

Every helper is a child of this process and is reaped here, even on Ctrl-C: PID 1
on the benchmark VM does not reap orphans. As a safety net this process makes
itself a child subreaper, so anything orphaned below it is reaped at the end too.

The same file also runs the Python listeners, in their own processes (so their
CPU and memory are theirs alone): `bench.py --role latency|storm|scale|engine --method M`;
the daemon benchmark's echo server and clients (`--role echo|client`); and the notify
benchmark's webhook receiver (`--role receiver`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import hmac
import json
import os
import platform
import queue
import random
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `monitor` without installing it
sys.path.insert(0, str(ROOT / "scripts"))
from bench_fleet import bench_fleet, fleet_tables  # noqa: E402 - one module per benchmark from here on
C_DIR = ROOT / "scripts" / "bench_c"
BENCHES = ("latency", "storm", "scale", "engine", "daemon", "notify", "fleet")


class BenchError(Exception):
    """A benchmark could not be carried out (a helper died, an answer never came)."""


# ======================================================================================
# Sizes
# ======================================================================================


@dataclass(frozen=True)
class Sizes:
    lat_rounds: int  # methods are interleaved: each round runs every method once
    lat_event_n: int  # samples per event-driven method (all rounds together)
    lat_poll_n: int  # psutil poll at 0.1 s
    lat_kill_n: int  # kill(pid, 0) at 1 s: each sample takes ~1 s
    lat_warmup: int  # samples dropped after each listener start (cold caches)
    storm_s: float
    storm_watched: int
    scale_ns: tuple[int, ...]  # watched-process counts for the scale benchmark
    engine_rounds: int  # sources interleaved as in latency: one engine per source per round
    engine_exit_n: int  # exit -> lock released samples per source (all rounds together)
    engine_n: int  # sessions with locks held at once
    engine_held_n: int  # exit samples taken while those are held
    engine_idle_s: float  # how long the idle CPU of the loaded engine is measured
    daemon_rounds: int  # echo server and daemon interleaved: each round measures both
    daemon_rtt_n: int  # `hello` requests per client (all rounds together)
    daemon_clients: int  # concurrent clients, each a process with its own connection
    daemon_lock_s: float  # how long the clients acquire and release locks
    daemon_sqlite_s: float  # bare SQLite commits, before and after the lock runs (each)
    daemon_launch_n: int  # runs of each command in the launch comparison
    notify_rounds: int  # the notify measures interleaved: each round runs every one
    notify_n: int  # samples per notify measure (all rounds together)
    notify_burst_n: int  # processes SIGKILLed at once in the bursts
    notify_churn_events: int  # lock events of churn before each subscriber measure (fills the stalled one)


FULL = Sizes(lat_rounds=5, lat_event_n=1000, lat_poll_n=200, lat_kill_n=30, lat_warmup=3,
             storm_s=10.0, storm_watched=100, scale_ns=(1_000, 10_000),
             engine_rounds=5, engine_exit_n=1000, engine_n=10_000, engine_held_n=100, engine_idle_s=5.0,
             daemon_rounds=5, daemon_rtt_n=5000, daemon_clients=10, daemon_lock_s=10.0, daemon_sqlite_s=2.0,
             daemon_launch_n=50, notify_rounds=5, notify_n=1000, notify_burst_n=200, notify_churn_events=3000)
QUICK = Sizes(lat_rounds=2, lat_event_n=50, lat_poll_n=10, lat_kill_n=4, lat_warmup=1,
              storm_s=2.0, storm_watched=100, scale_ns=(1_000,),
              engine_rounds=2, engine_exit_n=50, engine_n=1_000, engine_held_n=10, engine_idle_s=1.0,
              daemon_rounds=2, daemon_rtt_n=200, daemon_clients=10, daemon_lock_s=2.0, daemon_sqlite_s=0.5,
              daemon_launch_n=10, notify_rounds=2, notify_n=100, notify_burst_n=50, notify_churn_events=1500)


# ======================================================================================
# Small utilities
# ======================================================================================


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the tables."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cpu_us() -> int:
    """User+system CPU of this whole process (all threads) so far, in microseconds."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return round((ru.ru_utime + ru.ru_stime) * 1e6)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values: list[float]) -> float | None:
    return percentile(sorted(values), 50) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def fmt_us(us: float | None) -> str:
    if us is None:
        return "–"
    if us >= 10_000:
        return f"{us / 1000:.1f} ms"
    return f"{us:.0f} µs"


def fmt_x(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x < 100 else f"{x:.0f}×"


def fmt_num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def tidy(obj: Any) -> Any:
    """Round floats for a readable JSON file (µs to 0.1, ratios to 3 significant digits)."""
    if isinstance(obj, float):
        return round(obj, 1) if abs(obj) >= 100 else float(f"{obj:.3g}")
    if isinstance(obj, dict):
        return {k: tidy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tidy(v) for v in obj]
    return obj


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def read_pids(path: Path) -> list[int]:
    """A native int32 array written by one of the C helpers."""
    data = path.read_bytes()
    return list(struct.unpack(f"={len(data) // 4}i", data))


def matched_with_multiplicity(generated: list[int], captured: list[int]) -> int:
    """How many generated exits were captured: PIDs wrap in a storm, so count each PID
    as many times as it occurs on both sides (peers.md §3a score.py)."""
    have = Counter(captured)
    return sum(min(n, have[pid]) for pid, n in Counter(generated).items())


# ======================================================================================
# Child processes: every one registered, every one reaped
# ======================================================================================

HELPERS: list[Helper | DaemonProcess] = []
PR_SET_CHILD_SUBREAPER = 36


class Helper:
    """A child process we talk to in lines over its stdin and stdout.

    Each helper gets its own process group, so Ctrl-C reaches only this process,
    which then stops the helpers in order instead of leaving their children
    orphaned. `close()` always reaps it.
    """

    def __init__(self, name: str, argv: list[str], *, stop_signal: int | None = None) -> None:
        self.name = name
        self.stop_signal = stop_signal  # asks it to clean up after itself when we give up on it
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     process_group=0)
        self.kill_on_abandon: list[int] = []  # pidfds of its children, SIGKILLed if we give up on it
        self.ready: list[str] = []  # the words of its READY line
        self._buf = b""
        HELPERS.append(self)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    def go(self) -> None:
        """One byte on stdin: the start signal of the C helpers."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout:g} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise BenchError(f"{self.name} ended unexpectedly (exit status {self.proc.wait()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect_line(self, prefix: str, timeout: float) -> str:
        """The next line starting with `prefix` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line
            if line.startswith("ERR "):
                raise BenchError(f"{self.name}: {line[4:]}")

    def expect(self, prefix: str, timeout: float) -> list[str]:
        return self.expect_line(prefix, timeout).split()

    def close(self, timeout: float = 10.0, *, abandon: bool = False) -> int | None:
        """Stop it and reap it; returns its exit status.

        Normally: EOF on stdin, then SIGKILL if it is still there after `timeout`.
        `abandon` (something went wrong): its `stop_signal` if it has one, else (or if
        that fails) SIGKILL its children and it at once; orphaned children come to us
        as the subreaper (see reap_orphans).
        """
        if abandon and self.proc.returncode is None and self.stop_signal is not None:
            self.proc.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if abandon and self.proc.returncode is None:
            for fd in self.kill_on_abandon:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self.proc.kill()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop within {timeout:g} s: killing it")
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for fd in self.kill_on_abandon:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kill_on_abandon.clear()
        if self in HELPERS:
            HELPERS.remove(self)
        return self.proc.returncode


def close_all_helpers() -> None:
    for helper in reversed(list(HELPERS)):
        helper.close(timeout=5.0, abandon=True)


def become_subreaper() -> None:
    """Orphans below us get reparented to us rather than to a PID 1 that never reaps."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")


def reap_orphans() -> int:
    """Kill and reap any process still parented to us (the helpers are reaped by now)."""
    me, reaped = os.getpid(), 0
    for _ in range(5):
        kids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read().decode(errors="replace")
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == me:
                kids.append(int(entry))
        if not kids:
            break
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in kids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
                reaped += 1
    if reaped:
        log(f"reaped {reaped} orphaned processes")
    return reaped


# ======================================================================================
# Building the C helpers
# ======================================================================================

C_PROGRAMS = {"target": [], "cnlisten": ["-pthread"], "storm": [], "sleepers": [], "spawner": []}


def build_c_helpers(outdir: Path) -> dict[str, str]:
    """gcc -O2 every scripts/bench_c/*.c into `outdir` (a temp dir: no binaries in the tree)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc is needed to build the C helpers in scripts/bench_c/")
    bins = {}
    for name, extra in C_PROGRAMS.items():
        out = outdir / name
        cmd = [gcc, "-O2", "-Wall", *extra, "-o", str(out), str(C_DIR / f"{name}.c")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"building {name}.c failed:\n{result.stderr}")
        bins[name] = str(out)
    return bins


# ======================================================================================
# The listener side: runs in its own process (`--role ...`)
# ======================================================================================


class QueueSource:
    """What the two baselines share with a monitor source: watch(), stats() and an
    `async for` fed through a queue (None ends it)."""

    name = "baseline"

    def __init__(self) -> None:
        self._watched: dict[int, Any] = {}
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError

    def watch(self, key: Any) -> None:
        self._watched[key.pid] = key

    def stats(self) -> dict[str, Any]:
        return {"source": self.name, "watched": len(self._watched)}

    def __aiter__(self) -> QueueSource:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item


class KillPoller(QueueSource):
    """Baseline: `kill(pid, 0)` every `interval_s`, as `tail --pid` does.

    A zombie still answers kill(pid, 0), so this sees an exit only once the parent
    reaped; the latency harness reaps at once. Same interface as a monitor source.
    """

    name = "kill0"

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KillPoller:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self._queue.put_nowait(None)



    async def _run(self) -> None:
        from monitor.events import Exited

        deadline = time.monotonic()
        while True:
            deadline += self.interval_s  # a fixed grid: the harness picks the exit's phase
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            for pid, key in list(self._watched.items()):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    del self._watched[pid]
                    self._queue.put_nowait(Exited.from_wait_status(key, None, self.name, None, time.monotonic_ns()))


class MinimalAsyncioNetlink(QueueSource):
    """Diagnostic baseline: about the least an asyncio proc-connector reader can do.

    A non-blocking socket with the exit-only mask on `loop.add_reader`, decoded
    with one struct call, each watched exit handed to the `async for` consumer
    through an asyncio.Queue as an `Exited`: none of monitor's source code. Its gap
    to the C listener is what Python + asyncio cost; netlink's gap to it is what
    monitor's own event path costs.
    """

    name = "minimal"

    def __init__(self) -> None:
        super().__init__()
        self._sock: socket.socket | None = None

    async def __aenter__(self) -> MinimalAsyncioNetlink:
        from monitor.sources import cnproc

        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, cnproc.NETLINK_CONNECTOR)
        sock.bind((0, cnproc.CN_IDX_PROC))
        # The kernel handles the request inside send(): subscribed once it returns.
        sock.send(cnproc.subscribe_message(cnproc.PROC_CN_MCAST_LISTEN, cnproc.PROC_EVENT_EXIT))
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self._sock = sock
        return self

    async def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._queue.put_nowait(None)



    def _readable(self) -> None:
        from monitor.events import Exited
        from monitor.sources.cnproc import MESSAGE_SIZE, PROC_EVENT_EXIT, RECORD

        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(8192)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: a lost target shows up as "missed" in the harness
                continue
            if len(data) != MESSAGE_SIZE:
                continue
            _seq, what, _cpu, ts, pid, tgid, status, *_ = RECORD.unpack(data)
            if what == PROC_EVENT_EXIT and pid == tgid and tgid in self._watched:
                key = self._watched.pop(tgid)
                self._queue.put_nowait(Exited.from_wait_status(key, status, self.name, ts, time.monotonic_ns()))


def make_source(method: str) -> Any:
    """The source under test, by the method names used in the results."""
    from monitor.sources.netlink import NetlinkSource
    from monitor.sources.pidfd import PidfdSource
    from monitor.sources.poll import PollSource

    factories: dict[str, Callable[[], Any]] = {
        "netlink_python": lambda: NetlinkSource(types=("exit",), decoder="python"),
        "netlink_native": lambda: NetlinkSource(types=("exit",), decoder="native"),
        # Without the kernel's tgid filter: as with tree watches or more than 256 watches.
        "nofilter_python": lambda: NetlinkSource(types=("exit",), decoder="python", max_filtered_tgids=0),
        "nofilter_native": lambda: NetlinkSource(types=("exit",), decoder="native", max_filtered_tgids=0),
        "all_python": lambda: NetlinkSource(types=("exit",), all_events=True, decoder="python"),
        "all_native": lambda: NetlinkSource(types=("exit",), all_events=True, decoder="native"),
        "pidfd": PidfdSource,
        "poll_psutil_100ms": lambda: PollSource(interval_s=0.1),
        "kill0_1s": lambda: KillPoller(1.0),
        "py_asyncio_minimal": MinimalAsyncioNetlink,
    }
    return factories[method.removesuffix("_cb")]()


def say(line: str) -> None:
    os.write(1, line.encode() + b"\n")


class StdinLines:
    """Calls `handler(line)` for each line on stdin, from the event loop; `on_eof()` at EOF."""

    def __init__(self, handler: Callable[[str], None], on_eof: Callable[[], object]) -> None:
        self._buf = b""
        self._handler = handler
        self._on_eof = on_eof
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(0, self._readable)

    def _readable(self) -> None:
        data = os.read(0, 1 << 16)
        if not data:
            self._loop.remove_reader(0)
            self._on_eof()
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                self._handler(line.decode())
            except Exception as err:  # the harness must hear of it, not wait for an answer
                say(f"ERR {type(err).__name__}: {err}")


def report_exits_by_callback(source: Any, method: str) -> None:
    """For the `_cb` methods: the consumer runs inside the source's own reader callback
    (set_listener), and says "E pid t_consumer_ns kernel_ts_ns observed_ns" or "O"."""
    from monitor.events import Exited, Overrun

    if not method.endswith("_cb"):
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
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
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


ENGINE_SOURCES: dict[str, tuple[str, dict[str, Any]]] = {
    "netlink_native": ("netlink", {"decoder": "native"}),
    "netlink_python": ("netlink", {"decoder": "python"}),
    "pidfd": ("pidfd", {}),
}


async def engine_role(method: str, state_path: str) -> None:
    """An Engine on `state_path`, attaching what the harness names and stamping each release.

    Two moments are stamped per exit: the in-memory one (the wrapped
    `engine.locks.release_owner` returned the lock: anyone asking now sees the directory
    free) and the durable one (the transition listener, which runs after the commit).
    `Exited.observed_ns` (the source emitted it) comes from the wrapped `_on_event`.

    Protocol: "READY {json}" once start() returned (it is timed: with a state file that
    holds sessions, that is a restart's reconcile). "A pid dir" -> attach pid as a session
    with an auto lock on dir, answer "A pid"; on its exit "R pid observed_ns kernel_ts_ns
    memory_ns lock_committed_ns stop_committed_ns" (0 when unknown). "F path" -> attach
    every "pid dir" line of the file, in order, answer "F {json}". "I s" -> idle CPU over
    s seconds, answer "I {json}". "K n" -> count the releases of sessions not attached with
    "A" (the harness then kills them), answer "K", and "X {json}" once n are committed.
    "C" -> close the engine, answer "C {json}". EOF closes it (if still open) and ends.
    """
    from monitor.engine import Engine
    from monitor.events import Exited, LockReleased, SessionStopped
    from monitor.identity import ProcessKey

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a pidfd per watched process
    loop = asyncio.get_running_loop()
    source, options = ENGINE_SOURCES[method]
    engine = Engine(state_path, source=source, source_options=options)
    probes: dict[ProcessKey, dict[str, int]] = {}  # the "A" sessions' stamps, by their key
    probe_ids: dict[str, ProcessKey] = {}  # session id -> key, for SessionStopped
    bulk = {"expected": 0, "memory": 0, "committed": 0, "stopped": 0,
            "first_memory_ns": 0, "last_memory_ns": 0, "first_committed_ns": 0, "last_committed_ns": 0}
    tasks: set[asyncio.Task[None]] = set()
    finished = asyncio.Event()

    on_event = engine._on_event

    def stamped_event(event: Any) -> None:
        if isinstance(event, Exited) and event.key in probes:
            probes[event.key].update(observed=event.observed_ns, kernel=event.kernel_ts_ns or 0)
        on_event(event)

    release_owner = engine.locks.release_owner

    def stamped_release(key: ProcessKey, evidence: str) -> list[Any]:
        released = release_owner(key, evidence)
        if released:
            now = time.monotonic_ns()
            if key in probes:
                probes[key]["memory"] = now
            else:
                bulk["memory"] += len(released)
                bulk["first_memory_ns"] = bulk["first_memory_ns"] or now
                bulk["last_memory_ns"] = now
        return released

    engine._on_event = stamped_event  # type: ignore[method-assign]
    engine.locks.release_owner = stamped_release  # type: ignore[method-assign]

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


async def echo_role(path: str) -> None:
    """The baseline of the daemon benchmark: about the least an asyncio Unix-socket server
    can do per NDJSON request. Each line read is written back as it came, one connection
    per task, as the daemon's server serves them; no JSON, no dispatch. EOF on stdin ends it.
    """
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readuntil(b"\n")
                writer.write(line)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=path)
    finished = asyncio.Event()
    StdinLines(lambda line: None, finished.set)
    say("READY")
    await finished.wait()
    server.close()
    await server.wait_closed()


class LineConnection:
    """A blocking NDJSON client on a Unix socket, the same for the daemon and the echo
    server: one request line out, one answer line in, JSON-encoded and -decoded on each side."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def call(self, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"id": request_id, "method": method, "params": params}).encode() + b"\n")
        line = self.file.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        if answer.get("id") != request_id:
            raise RuntimeError(f"{method}: answer for request {answer.get('id')}, expected {request_id}")
        return answer

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def client_job(conn: LineConnection, job: dict[str, Any]) -> dict[str, Any]:
    """Requests from the moment `start_ns` (CLOCK_MONOTONIC, shared by every client):
    `n` hellos, or lock.acquire + lock.release of `directory` in a loop for `seconds`.
    Each request's round trip (encode, send, receive, decode) in ns."""
    for i in range(job.get("warmup", 0)):  # a warm connection and warm code, not counted
        conn.call(-1 - i, "hello", {})
    time.sleep(max(0, job["start_ns"] - time.monotonic_ns()) / 1e9)
    clock = time.perf_counter_ns
    start = time.monotonic_ns()
    if job["mode"] == "hello":
        lat = []
        for i in range(job["n"]):
            t0 = clock()
            conn.call(i, "hello", {})
            lat.append(clock() - t0)
        return {"start_ns": start, "end_ns": time.monotonic_ns(), "lat_ns": lat}
    acquire = {"directory": job["directory"], "by": "bench", "reason": "daemon benchmark"}
    release = {"directory": job["directory"]}
    acquire_ns, release_ns = [], []
    deadline, i = start + round(job["seconds"] * 1e9), 0
    while time.monotonic_ns() < deadline:
        t0 = clock()
        conn.call(i, "lock.acquire", acquire)
        t1 = clock()
        conn.call(i + 1, "lock.release", release)
        t2 = clock()
        acquire_ns.append(t1 - t0)
        release_ns.append(t2 - t1)
        i += 2
    return {"start_ns": start, "end_ns": time.monotonic_ns(), "acquire_ns": acquire_ns, "release_ns": release_ns}


def client_role() -> None:
    """One client of the daemon benchmark, in a process of its own (the GIL of one process
    would serialize ten clients). Protocol: "C name path" -> connect, answer "C name";
    "G {json}" -> run that job (client_job) on the named connection, answer "DONE {json}";
    EOF ends it."""
    conns: dict[str, LineConnection] = {}
    say("READY")
    try:
        while line := sys.stdin.buffer.readline():
            words = line.decode().split(maxsplit=1)
            try:
                if words[0] == "C":
                    name, path = words[1].split()
                    conns[name] = LineConnection(path)
                    say(f"C {name}")
                elif words[0] == "G":
                    job = json.loads(words[1])
                    say("DONE " + json.dumps(client_job(conns[job["target"]], job)))
            except Exception as err:  # the harness must hear of it, not wait for an answer
                say(f"ERR {type(err).__name__}: {err}")
    finally:
        for conn in conns.values():
            conn.close()


def run_role(role: str, method: str, dump: str | None, state: str | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)  # overrun warnings would flood the terminal
    if role == "client":
        client_role()
        return 0
    if role == "receiver":
        receiver_role()
        return 0
    roles = {"latency": lambda: latency_role(method), "storm": lambda: storm_role(method, dump),
             "scale": lambda: scale_role(method), "engine": lambda: engine_role(method, state or "state.db"),
             "echo": lambda: echo_role(state or "echo.sock")}
    asyncio.run(roles[role]())
    return 0


# ======================================================================================
# Harness side
# ======================================================================================


@dataclass
class Ctx:
    bins: dict[str, str]
    sizes: Sizes
    tmp: Path
    native: bool
    rng: random.Random


def python_listener(role: str, method: str, *extra: str) -> Helper:
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--method", method, *extra]
    return Helper(f"{role} listener ({method})", argv)


def start_listener(ctx: Ctx, role: str, method: str, *extra: str) -> Helper:
    """The listener for `method`, once it says READY (the subscription is confirmed)."""
    if method == "c_listener":
        helper = Helper("C listener", [ctx.bins["cnlisten"], "lat" if role == "latency" else "storm", *extra])
    else:
        helper = python_listener(role, method, *extra)
    try:
        helper.ready = helper.expect("READY", 30)
    except BaseException:
        helper.close(abandon=True)
        raise
    return helper


# -- 1. latency -------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyMethod:
    key: str
    label: str
    samples: int
    poll_period_s: float | None = None  # polling: the exit lands at a random phase of it
    target_ratio: float | None = None  # the project's goal, as a multiple of the C listener

    @property
    def timeout_s(self) -> float:
        return 3.0 if self.poll_period_s is None else 3 * self.poll_period_s + 2


def latency_methods(ctx: Ctx) -> list[LatencyMethod]:
    s = ctx.sizes
    methods = [
        LatencyMethod("c_listener", "C proc-connector listener (floor)", s.lat_event_n),
        LatencyMethod("py_asyncio_minimal", "minimal asyncio reader, no monitor code (diagnostic)", s.lat_event_n),
        LatencyMethod("netlink_python", "netlink, python decoder", s.lat_event_n, target_ratio=1.15),
        LatencyMethod("netlink_native", "netlink, native decoder", s.lat_event_n, target_ratio=1.15),
        LatencyMethod("netlink_python_cb", "netlink, python decoder, listener callback", s.lat_event_n, target_ratio=1.15),
        LatencyMethod("netlink_native_cb", "netlink, native decoder, listener callback", s.lat_event_n, target_ratio=1.15),
        LatencyMethod("pidfd", "pidfd", s.lat_event_n, target_ratio=1.3),
        LatencyMethod("pidfd_cb", "pidfd, listener callback", s.lat_event_n, target_ratio=1.3),
        LatencyMethod("poll_psutil_100ms", "poll every 0.1 s (PollSource)", s.lat_poll_n, poll_period_s=0.1),
        LatencyMethod("kill0_1s", "kill(pid, 0) every 1 s", s.lat_kill_n, poll_period_s=1.0),
    ]
    if not ctx.native:
        methods = [m for m in methods if "native" not in m.key]
    return methods


def time_one_exit(ctx: Ctx, listener: Helper, arm: Callable[[int], None], answer: str,
                  timeout_s: float) -> tuple[int, list[str]] | None:
    """Spawn a target (our child, so that we reap it at once: a zombie still reads as alive to
    kill(pid, 0)), let `arm(pid)` make the listener watch it, release it, and return its own
    exit stamp with the words of the listener's "`answer` pid ..." line; None if none came."""
    target = subprocess.Popen([ctx.bins["target"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        arm(target.pid)
        assert target.stdin is not None and target.stdout is not None
        target.stdin.write(b"x")
        target.wait()
        (t_exit,) = struct.unpack("=q", target.stdout.read(8))
        try:
            return t_exit, listener.expect(f"{answer} {target.pid} ", timeout_s)
        except BenchError:
            if listener.proc.poll() is not None:
                raise
            return None
    finally:
        if target.returncode is None:
            target.kill()
            target.wait()
        for pipe in (target.stdin, target.stdout):
            if pipe is not None:
                pipe.close()


def one_exit(ctx: Ctx, listener: Helper, method: LatencyMethod) -> dict[str, int] | None:
    """Spawn a target, have the listener watch it, release it, reap it; time the exit.

    The target is our child, not the listener's: the non-child case is what a
    monitor of other people's processes faces. Returns None if no event came.
    """
    def arm(pid: int) -> None:
        listener.send(f"W {pid}")
        listener.expect(f"W {pid}", 10)
        if method.poll_period_s:
            time.sleep(ctx.rng.uniform(0, method.poll_period_s))  # else polls phase-lock (peers.md §3c)

    timed = time_one_exit(ctx, listener, arm, "E", method.timeout_s)
    if timed is None:
        return None
    t_exit, words = timed
    sample = {"exit": t_exit, "consumer": int(words[2])}
    if len(words) > 3 and int(words[3]):
        sample["kernel"] = int(words[3])
    if len(words) > 4 and int(words[4]):
        sample["observed"] = int(words[4])
    return sample


def summarize_latency(samples: list[dict[str, int]], missed: int) -> dict[str, Any]:
    total = sorted((s["consumer"] - s["exit"]) / 1000 for s in samples)
    result: dict[str, Any] = {
        "n": len(total), "missed": missed,
        "p50_us": percentile(total, 50), "p90_us": percentile(total, 90), "p99_us": percentile(total, 99),
        "mean_us": sum(total) / len(total) if total else None, "max_us": total[-1] if total else None,
    }
    # Where the time goes (medians): the kernel's own stamp of the exit event, and
    # the source's `observed_ns` (set when it emitted the Exited), where known.
    parts: dict[str, list[float]] = {"exit_to_kernel_us": [], "kernel_to_observed_us": [],
                                     "observed_to_consumer_us": [], "exit_to_observed_us": []}
    for s in samples:
        if "kernel" in s:
            parts["exit_to_kernel_us"].append((s["kernel"] - s["exit"]) / 1000)
            parts["kernel_to_observed_us"].append((s.get("observed", s["consumer"]) - s["kernel"]) / 1000)
        if "observed" in s:
            parts["observed_to_consumer_us"].append((s["consumer"] - s["observed"]) / 1000)
            parts["exit_to_observed_us"].append((s["observed"] - s["exit"]) / 1000)
    result["breakdown_median_us"] = {k: median(v) for k, v in parts.items() if v}
    result["samples_us"] = [round(x, 1) for x in total]
    return result


def bench_latency(ctx: Ctx) -> dict[str, Any]:
    methods = latency_methods(ctx)
    rounds = ctx.sizes.lat_rounds
    samples: dict[str, list[dict[str, int]]] = {m.key: [] for m in methods}
    missed = dict.fromkeys(samples, 0)
    for r in range(rounds):
        # Interleave: every method once per round, in a rotated order, so that slow
        # phases of this noisy VM spread over all of them. One listener at a time:
        # a second netlink listener would be woken by every exit too.
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for method in order:
            n = method.samples // rounds + (1 if r < method.samples % rounds else 0)
            log(f"latency round {r + 1}/{rounds}: {method.key} x{n}")
            listener = start_listener(ctx, "latency", method.key)
            try:
                warmup = ctx.sizes.lat_warmup if method.poll_period_s is None else 0
                for i in range(warmup + n):
                    sample = one_exit(ctx, listener, method)
                    if i < warmup:
                        continue
                    if sample is None:
                        missed[method.key] += 1
                    else:
                        samples[method.key].append(sample)
            finally:
                listener.close()
    results = {m.key: {"label": m.label, "target_ratio": m.target_ratio, **summarize_latency(samples[m.key], missed[m.key])}
               for m in methods}
    floor = results["c_listener"]
    for res in results.values():
        res["ratio_p50"] = ratio(res["p50_us"], floor["p50_us"])
        res["ratio_p99"] = ratio(res["p99_us"], floor["p99_us"])
        if res["target_ratio"] is not None and res["ratio_p50"] is not None:
            res["meets_target"] = res["ratio_p50"] <= res["target_ratio"] and res["ratio_p99"] <= res["target_ratio"]
    out: dict[str, Any] = {"baseline": "c_listener", "rounds": rounds, "methods": results}
    if not ctx.native:
        for key, label in (("netlink_native", "netlink, native decoder"),
                           ("netlink_native_cb", "netlink, native decoder, listener callback")):
            out["methods"][key] = {"label": label, "status": "not built"}
    return out


def latency_tables(res: dict[str, Any]) -> str:
    rows, parts_rows = [], []
    for m in res["methods"].values():
        if "p50_us" not in m:
            rows.append([m["label"], m.get("status", "–"), "–", "–", "–", "–", "–", "–"])
            continue
        target = "–"
        if m.get("target_ratio") is not None:
            target = f"≤ {m['target_ratio']:.2f}× {'✔' if m.get('meets_target') else '✘'}"
        n = str(m["n"]) + (f" ({m['missed']} missed)" if m["missed"] else "")
        rows.append([m["label"], n, fmt_us(m["p50_us"]), fmt_us(m["p90_us"]), fmt_us(m["p99_us"]),
                     fmt_x(m["ratio_p50"]), fmt_x(m["ratio_p99"]), target])
        b = m["breakdown_median_us"]
        if b:
            parts_rows.append([m["label"], fmt_us(b.get("exit_to_kernel_us")), fmt_us(b.get("kernel_to_observed_us")),
                               fmt_us(b.get("observed_to_consumer_us")), fmt_us(b.get("exit_to_observed_us"))])
    table = md_table(["method", "n", "p50", "p90", "p99", "p50 vs C", "p99 vs C", "target"], rows)
    parts = md_table(["method", "exit → kernel stamp", "kernel stamp → source emits (C: recv)",
                      "source emits → consumer", "exit → source emits"], parts_rows)
    return (f"{table}\n\nWhere the time goes (medians of per-exit differences; the kernel stamp is the "
            f"proc connector's `timestamp_ns`, the source's is `Exited.observed_ns`):\n\n{parts}")


# -- 2. storm ---------------------------------------------------------------------------


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


def per_1k(cpu_ms: float, count: int) -> float | None:
    return cpu_ms / (count / 1000) if count else None


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


def bench_storm(ctx: Ctx) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for method in storm_methods(ctx):
        log(f"storm: {method}, {ctx.sizes.storm_s:g} s, {ctx.sizes.storm_watched} watched")
        runs[method] = storm_run(ctx, method)
    if not ctx.native:
        for method in ("netlink_native", "nofilter_native", "all_native"):
            runs[method] = {"status": "not built"}
    return {"duration_s": ctx.sizes.storm_s, "generators": 2, "watched": ctx.sizes.storm_watched,
            "netlink_types": ["exit"], "baseline": "c_listener (same storm, exit-only mask, 16 MiB)", "runs": runs}


LABELS = {"netlink_native": "netlink, native decoder", "netlink_python": "netlink, python decoder",
          "nofilter_native": "netlink, native, no tgid filter (trees, > 256 watches)",
          "nofilter_python": "netlink, python, no tgid filter (trees, > 256 watches)",
                "pidfd": "pidfd", "all_native": "netlink all-events, native decoder",
                "all_python": "netlink all-events, python decoder"}


def storm_tables(res: dict[str, Any]) -> str:
    watched_rows: list[list[str]] = []
    all_rows: list[list[str]] = []
    for method, run in res["runs"].items():
        label = LABELS.get(method, method)
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
    watched = md_table(["listener", "storm forks/s", "watched exits seen", "overruns", "CPU / 1k storm events",
                        "CPU / 1k forks", "C listener CPU / 1k events", "CPU vs C"], watched_rows)
    everything = md_table(["listener", "storm forks/s", "storm exits captured", "capture ratio",
                           "C capture ratio", "overruns", "CPU / 1k storm events", "CPU vs C"], all_rows)
    return (f"Watching {res['watched']} processes during a {res['duration_s']:g} s storm of 2 fork generators "
            f"(a storm event = one fork or exit message = 2 per fork):\n\n{watched}\n\n"
            f"All-events mode (types=exit), capturing the generators' children, matched by PID with multiplicity:"
            f"\n\n{everything}")


# -- 3. scale ---------------------------------------------------------------------------


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


def bench_scale(ctx: Ctx) -> dict[str, Any]:
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


def scale_table(res: dict[str, Any]) -> str:
    rows, failures = [], []
    for n, runs in res["runs"].items():
        for method, run in runs.items():
            label = LABELS.get(method, method)
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
    table = md_table(["source", "watched", "time to watch", "+ ProcessKey.of for all", "RSS delta", "RSS vs pidfd",
                      "open fds", "CPU to watch", "kill all → last Exited", "overruns"], rows)
    text = ("Idle processes watched by one listener process (its RSS and fd count before and after); then all "
            f"of them are SIGKILLed at once:\n\n{table}")
    if failures:
        text += "\n\nFailures:\n\n" + "\n".join(failures)
    return text


# -- 4. engine --------------------------------------------------------------------------


def engine_methods(ctx: Ctx) -> list[str]:
    return ["netlink_native", "netlink_python", "pidfd"] if ctx.native else ["netlink_python", "pidfd"]


def start_engine(ctx: Ctx, method: str, state: Path) -> tuple[Helper, dict[str, Any]]:
    """An engine process on `state`, once its start() has returned, and what its READY said."""
    helper = python_listener("engine", method, "--state", str(state))
    try:
        line = helper.expect_line("READY", 120 + ctx.sizes.engine_n / 100)
    except BaseException:
        helper.close(abandon=True)
        raise
    helper.ready = line.split()
    return helper, json.loads(line.split(" ", 1)[1])


def answer(helper: Helper, prefix: str, timeout: float) -> dict[str, Any]:
    """The JSON of the next "prefix {json}" line."""
    return dict(json.loads(helper.expect_line(prefix + " ", timeout).split(" ", 1)[1]))


def sqlite_commit_floor(directory: Path, n: int = 200) -> dict[str, Any]:
    """The floor under "committed": one small transaction the way the Store commits (WAL,
    synchronous=FULL, BEGIN IMMEDIATE), on the file system that holds the engines' state."""
    import sqlite3

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
    return {"n": n, **spread(sorted(times))}


def spread(sorted_us: list[float]) -> dict[str, float | None]:
    return {"p50_us": percentile(sorted_us, 50), "p90_us": percentile(sorted_us, 90),
            "p99_us": percentile(sorted_us, 99), "max_us": sorted_us[-1] if sorted_us else None}


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
    t_exit, words = timed
    observed, kernel, memory, lock, stop = map(int, words[2:7])
    return {"exit": t_exit, "observed": observed, "kernel": kernel, "memory": memory, "lock": lock, "stop": stop}


def summarize_engine_exits(samples: list[dict[str, int]], missed: int) -> dict[str, Any]:
    def since_exit(stamp: str) -> list[float]:
        return sorted((s[stamp] - s["exit"]) / 1000 for s in samples if s[stamp])

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
                for i in range(ctx.sizes.lat_warmup + n):  # the latency benchmark's warmup
                    sample = engine_exit(ctx, engine, run_dir / f"s{i:04d}")
                    if i < ctx.sizes.lat_warmup:
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


def bench_engine(ctx: Ctx) -> dict[str, Any]:
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


def engine_tables(res: dict[str, Any]) -> str:
    floor = res["sqlite_commit"]
    rows, parts_rows = [], []
    for method, m in res["exit"].items():
        label = LABELS.get(method, method)
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
    exits = md_table(["source", "n", "lock gone in memory p50", "p99", "`LockReleased` committed p50", "p99",
                      "`SessionStopped` committed p50", "p99"], rows)
    parts = md_table(["source", "exit → kernel stamp", "exit → source emits `Exited`", "emits → lock gone in memory",
                      "lock gone → `LockReleased` delivered", "that vs one SQLite commit"], parts_rows)

    state_rows: list[list[str]] = []
    restart_rows: list[list[str]] = []
    held_rows: list[list[str]] = []
    failures: list[str] = []
    n = res["scale"]["n"]
    for method, run in res["scale"]["runs"].items():
        label = LABELS.get(method, method)
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
    state = md_table(["source", "sessions / locks", "attach all (first 1k → last 1k)", "CPU to attach", "RSS delta",
                      "open fds", "state file", "idle CPU"], state_rows)
    restart = md_table(["source", "restart: start() → return", "sessions / locks loaded", "vs start on an empty state",
                        "RSS added by start()", "once all stopped: start()", "sessions it loads"], restart_rows)
    held = md_table(["source", "n", "lock gone in memory p50", "p99", "`LockReleased` committed p50", "p99",
                     "committed p50 vs none held", "kill all → last lock gone in memory",
                     "→ first `LockReleased` committed", "→ last committed", "overruns"], held_rows)
    text = (f"A session per target (not the engine's child) with an auto lock on a directory of its own; the "
            f"target stamps CLOCK_MONOTONIC and exits. Lock gone in memory: the engine's "
            f"`locks.release_owner` has returned it; committed: the transition listener, which runs after the "
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


# -- 5. daemon ---------------------------------------------------------------------------

def proc_cpu_s(pid: int) -> float:
    """CPU time of a process's live threads so far, in ns precision from their schedstat
    (/proc/PID/stat counts in clock ticks: too coarse for a few thousand requests). A
    thread that ends takes its time with it; the servers here keep theirs."""
    total_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total_ns += int(f.read().split()[0])
    return total_ns / 1e9


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class DaemonProcess:
    """`monitor daemon` in the foreground, in a process group of its own, its output in a
    file. Stopped with SIGTERM (its clean shutdown), SIGKILL only if that takes longer than
    `timeout`; always reaped. Registered with the helpers, so Ctrl-C stops it too."""

    def __init__(self, python: str, socket_path: Path, state_dir: Path, config: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in close()
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "monitor", "--socket", str(socket_path), "--state-dir", str(state_dir),
                 "daemon", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, process_group=0, cwd=ROOT)
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        HELPERS.append(self)

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Its `hello`, once it answers on the socket."""
        from monitor.client import Client, DaemonUnreachable

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the daemon ended at start (exit status {self.proc.returncode}):\n{self.output()}")
            if self.socket_path.exists():
                with contextlib.suppress(DaemonUnreachable, OSError), Client(self.socket_path, timeout_s=10) as client:
                    hello: dict[str, Any] = client.call("hello")
                    return hello
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon did not answer within {timeout:g} s:\n{self.output()}")
            time.sleep(0.02)

    def call(self, method: str, **params: Any) -> Any:
        from monitor.client import Client

        with Client(self.socket_path, timeout_s=30) as client:
            return client.call(method, **params)

    def close(self, timeout: float = 10.0, *, abandon: bool = False) -> int | None:
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"the daemon did not stop within {timeout:g} s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self in HELPERS:
            HELPERS.remove(self)
        return self.proc.returncode


def start_clients(k: int, targets: dict[str, Path]) -> list[Helper]:
    """`k` client processes, each connected to every target (a connection of its own to each)."""
    clients: list[Helper] = []
    try:
        for i in range(k):
            clients.append(Helper(f"client {i}", [sys.executable, str(Path(__file__).resolve()), "--role", "client"]))
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
    import sqlite3

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
        run["acquire"] = spread(sorted(x / 1000 for x in acquire))
        run["release"] = spread(sorted(x / 1000 for x in release))
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


def bench_daemon(ctx: Ctx) -> dict[str, Any]:
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
        echo = Helper("echo server", [sys.executable, str(Path(__file__).resolve()), "--role", "echo", "--state", str(echo_path)])
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


def daemon_tables(res: dict[str, Any]) -> str:
    k = str(res["clients"])
    rtt = res["round_trip"]
    rows = []
    for name, label in (("echo", "asyncio echo server (baseline)"), ("daemon", "daemon `hello`")):
        for n in ("1", k):
            r = rtt[name][n]
            rows.append([label, n, f"{r['n']:,}", f"{r['requests_per_s']:,.0f}", fmt_us(r["p50_us"]), fmt_us(r["p90_us"]),
                         fmt_us(r["p99_us"]), fmt_x(r.get("p50_vs_echo")), fmt_x(r.get("p99_vs_echo")),
                         fmt_x(r.get("throughput_vs_echo")), f"{r['server_cpu_us_per_request']:.0f} µs"])
    round_trips = md_table(["server", "clients", "requests", "requests/s", "p50", "p90", "p99", "p50 vs echo",
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
    locks = md_table(["what", "clients", "ops", "rate", "p50", "p99", "acquire p50 / release p50", "rate vs SQLite commits/s",
                      "p50 vs one commit", "daemon CPU / op", "daemon CPU (of one core)"], lock_rows)
    la = res["launch"]
    launch_rows = []
    for r in la["commands"].values():
        launch_rows.append([r["label"], str(r["n"]), fmt_us(r["p50_us"]), fmt_us(r["p99_us"]),
                            fmt_us(r["p50_minus_sh_us"]) if r["p50_minus_sh_us"] >= 0 else f"−{fmt_us(-r['p50_minus_sh_us'])}",
                            fmt_x(r["p50_vs_sh"]), fmt_x(r["p99_vs_sh"])])
    launch = md_table(["command", "n", "p50", "p99", "p50 − `sh -c true`", "p50 vs `sh -c true`", "p99 vs `sh -c true`"], launch_rows)
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


# -- 6. notify ---------------------------------------------------------------------------

NOTIFY_SECRET = "whsec_" + base64.b64encode(b"the notify benchmark's key, not a secret").decode()
NOTIFY_MEASURES = ("webhook_baseline", "webhook", "subscriber_baseline", "subscriber", "stalled")
NOTIFY_BASELINE_OF = {"webhook_baseline": "webhook_baseline", "webhook": "webhook_baseline",
                      "subscriber_baseline": "subscriber_baseline", "subscriber": "subscriber_baseline",
                      "stalled": "subscriber_baseline"}
NOTIFY_LABELS = {
    "webhook_baseline": "bench's own pidfd wait + httpcore POST (baseline)",
    "webhook": "daemon: exit → `session.stopped` webhook received",
    "subscriber_baseline": "bench's own pidfd wait + a line over a socketpair (baseline)",
    "subscriber": "daemon: exit → `session.stopped` subscriber line read",
    "stalled": "the same, another subscriber stalled",
}
STALLED_RCVBUF = 4096  # asked for; the kernel doubles it
NOTIFY_SUBSCRIBER_BUFFER = 10_000  # the daemon's default, written into its config: events a subscriber may lag
CHURN_CONNECTIONS = 4  # lock churn: connections acquiring and releasing at once
NOTIFY_TIMEOUT_S = 10.0  # one notification; later is a miss


def receiver_role() -> None:
    """The notify benchmark's webhook receiver, in a process of its own so that its threads never
    wait for the harness's GIL: tests/receiver.py's Receiver (each request stamped with
    time.monotonic_ns() as it is read), reported as "H at_ns signature_ok type session_id"
    once stamped. "READY url" first; EOF on stdin ends it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from receiver import Receiver, standard_signature_ok  # type: ignore[import-not-found]

    eof = threading.Event()
    with Receiver() as receiver:
        def wait_for_eof() -> None:
            sys.stdin.buffer.read()
            eof.set()
            with receiver.arrived:
                receiver.arrived.notify_all()

        threading.Thread(target=wait_for_eof, name="receiver-stdin", daemon=True).start()
        say(f"READY {receiver.url}")
        reported = [0]
        while True:
            with receiver.arrived:
                receiver.arrived.wait_for(lambda: len(receiver.requests) > reported[0] or eof.is_set())
                new = receiver.requests[reported[0]:]
            if not new:
                break  # EOF, and everything said
            for request in new:
                body = request.json
                ok = standard_signature_ok(request, NOTIFY_SECRET)
                say(f"H {request.at_ns} {int(ok)} {body.get('type')} {body.get('session_id')}")
            reported[0] += len(new)


def spawn_sleeper() -> tuple[subprocess.Popen[bytes], int]:
    """A long-running child of ours to SIGKILL, and a pidfd of it (the kill, the baseline's wait)."""
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        return child, os.pidfd_open(child.pid)
    except BaseException:
        child.kill()
        child.wait()
        raise


def reap_sleeper(child: subprocess.Popen[bytes], pidfd: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    child.wait()
    os.close(pidfd)


class Arrivals:
    """Tags read by a thread of its own from `tags` (a blocking iterator), each stamped with
    time.monotonic_ns() the moment the read returns; `stop` makes the iterator end."""

    def __init__(self, name: str, tags: Any, stop: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._early: dict[str, int] = {}
        self._stop = stop
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(tags,), name=name)
        self._thread.start()

    def _run(self, tags: Any) -> None:
        try:
            for tag in tags:
                self._queue.put((tag, time.monotonic_ns()))
        except Exception as err:  # the harness sees it as misses, and the reason in the results
            self.error = f"{type(err).__name__}: {err}"

    def wait(self, tag: str, timeout_s: float) -> int | None:
        """When `tag` was read; None if it was not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while tag not in self._early:
            try:
                got, at_ns = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            self._early[got] = at_ns
        return self._early.pop(tag)

    def close(self) -> None:
        self._stop()
        self._thread.join(10)
        if self._thread.is_alive():
            raise BenchError(f"{self._thread.name} did not stop")


def subscriber_arrivals(path: Path) -> Arrivals:
    """A `Client.subscribe(types=["session.stopped"])` connection, its lines read and stamped by a thread."""
    from monitor.client import Client

    client = Client(path, timeout_s=30)
    stream = client.subscribe(types=["session.stopped"])

    def stop() -> None:
        # A subscription has no timeout; shutting the socket down ends the thread's readline.
        with contextlib.suppress(OSError):
            client._sock.shutdown(socket.SHUT_RDWR)

    arrivals = Arrivals("notify-subscriber", (str(event.get("session_id")) for event in stream), stop)
    close = arrivals.close

    def close_all() -> None:
        close()
        client.close()

    arrivals.close = close_all  # type: ignore[method-assign]
    return arrivals


def socketpair_arrivals() -> tuple[socket.socket, Arrivals]:
    """The subscriber baseline's channel: a Unix socketpair, one end written by the harness, the
    other's lines read and stamped by a thread. Returns the writing end."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    lines = reader.makefile("rb")

    def tags() -> Any:
        while line := lines.readline():
            yield line.decode().strip()

    def stop() -> None:
        writer.close()  # EOF for the reader
    arrivals = Arrivals("notify-socketpair", tags(), stop)
    close = arrivals.close

    def close_all() -> None:
        close()
        lines.close()
        reader.close()

    arrivals.close = close_all  # type: ignore[method-assign]
    return writer, arrivals


class BaselinePoster:
    """The least a sender could do: a small JSON, signed as Standard Webhooks says (one HMAC),
    POSTed with httpcore (the library the daemon uses), synchronously, answer read."""

    def __init__(self, url: str) -> None:
        import httpcore

        self.url = url
        self.key = base64.b64decode(NOTIFY_SECRET.removeprefix("whsec_"))
        self.pool = httpcore.ConnectionPool(retries=0)

    def post(self, tag: str) -> int:
        body = json.dumps({"type": "bench.exited", "session_id": tag}, separators=(",", ":")).encode()
        stamp = str(int(time.time()))
        signature = base64.b64encode(hmac.new(self.key, f"{tag}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
        headers = [("Content-Type", "application/json"), ("webhook-id", tag), ("webhook-timestamp", stamp),
                   ("webhook-signature", "v1," + signature)]
        response = self.pool.request("POST", self.url, headers=headers, content=body,
                                     extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), 10.0)})
        return int(response.status)

    def close(self) -> None:
        self.pool.close()


class StalledSubscriber:
    """An `events.subscribe` to every event type that reads its answer and nothing more, with
    a small SO_RCVBUF. The data a Unix stream socket can have queued is bounded by the
    sender's SO_SNDBUF, not the receiver's SO_RCVBUF (net/unix/af_unix.c: unix_stream_sendmsg
    allocates with sock_alloc_send_pskb on the sending socket), so the daemon's send buffer
    fills first, then its transport's buffer, then its queue for this subscriber."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
            self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            self.sock.settimeout(30)
            self.sock.connect(str(path))
            self.sock.sendall(b'{"id":1,"method":"events.subscribe","params":{}}\n')
            peeked = b""
            while b"\n" not in peeked:  # the answer, and not a byte past it
                peeked = self.sock.recv(65536, socket.MSG_PEEK)
                if not peeked:
                    raise BenchError("the daemon closed the stalled subscriber's connection at once")
            answer = json.loads(self.sock.recv(peeked.index(b"\n") + 1))
            if "result" not in answer:
                raise BenchError(f"events.subscribe: {answer}")
            self.last_id = int(answer["result"]["last_id"])
        except BaseException:
            self.sock.close()
            raise

    def queued(self) -> tuple[int, int]:
        """Bytes and whole lines in our receive queue, peeked (never read)."""
        size = int(struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])
        if not size:
            return 0, 0
        return size, self.sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT).count(b"\n")

    def state(self, last_id: int) -> dict[str, int]:
        """Events published to it since it subscribed, how many of them wait in our socket, and
        how many the daemon still holds for it (its send and transport buffers, its queue)."""
        size, lines = self.queued()
        published = last_id - self.last_id
        return {"published": published, "socket_bytes": size, "socket_lines": lines, "held_by_daemon": published - lines}

    def read_to_end(self, timeout_s: float) -> dict[str, Any]:
        """Now read it all: the lines, whether the daemon said `too_slow`, whether it closed."""
        self.sock.settimeout(timeout_s)
        data, eof = b"", False
        with contextlib.suppress(TimeoutError):
            while True:
                try:
                    chunk = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    eof = True
                    break
                data += chunk
        return {"lines_read": data.count(b"\n"), "too_slow_said": b'"too_slow"' in data, "closed_by_daemon": eof}

    def close(self) -> None:
        self.sock.close()


class NotifyRig:
    """A receiver process, a daemon (netlink source) whose one webhook endpoint is that receiver
    for `session.stopped`, a connection for requests, and the baseline's poster."""

    def __init__(self, ctx: Ctx, work: Path) -> None:
        from monitor.client import Client

        self.work = work
        self.helpers: list[Helper | DaemonProcess] = []
        self.receiver = Helper("webhook receiver", [sys.executable, str(Path(__file__).resolve()), "--role", "receiver"])
        self.helpers.append(self.receiver)
        self.url = self.receiver.expect("READY", 30)[1]
        config = work / "config.toml"
        endpoint = {"name": "bench", "url": self.url, "secret": NOTIFY_SECRET, "events": ["session.stopped"],
                    "allow_private": True, "timeout_s": 10, "retry_first_s": 0.5}
        settings = "".join(f"{k} = {json.dumps(v)}\n" for k, v in endpoint.items())
        config.write_text(f'source = "netlink"\nsubscriber_buffer = {NOTIFY_SUBSCRIBER_BUFFER}\n\n[[webhooks]]\n{settings}')
        config.chmod(0o600)
        self.daemon = DaemonProcess(sys.executable, work / "run" / "monitor.sock", work / "state", config, work / "daemon.log")
        self.helpers.append(self.daemon)
        self.hello = self.daemon.wait_ready(60)
        if self.hello.get("source") != "netlink":
            raise BenchError(f"the daemon runs the {self.hello.get('source')} source, not netlink")
        self.rpc = Client(self.daemon.socket_path, timeout_s=30)
        self.poster = BaselinePoster(self.url)
        self.hooks: dict[str, tuple[int, bool]] = {}  # session id or tag -> (arrival, signature ok), not yet claimed
        self.signatures_bad = 0

    def close(self, *, abandon: bool) -> int | None:
        self.rpc.close()
        self.poster.close()
        for helper in reversed(self.helpers):
            helper.close(abandon=abandon)
        return self.daemon.proc.returncode

    def wait_hook(self, tag: str, timeout_s: float) -> tuple[int, bool] | None:
        """(arrival, signature verified) of the webhook for session (or baseline tag) `tag`."""
        deadline = time.monotonic() + timeout_s
        while tag not in self.hooks:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                words = self.receiver.readline(left).split()
            except BenchError:
                if self.receiver.proc.poll() is not None:
                    raise
                return None
            if words[0] == "H":
                self.hooks[words[4]] = (int(words[1]), words[2] == "1")
                self.signatures_bad += words[2] != "1"
        return self.hooks.pop(tag)

    def attach(self, pid: int) -> str:
        session: dict[str, Any] = self.rpc.call("session.attach", pid=pid, lock=False)
        return str(session["id"])

    def last_event_id(self) -> int:
        from monitor.client import Client

        with Client(self.daemon.socket_path, timeout_s=30) as client:
            client.subscribe(types=["fuse.fired"])  # any type: only the answer's last_id is read
            return int(client.subscription["last_id"])

    def dropped_subscribers(self) -> float:
        for line in str(self.rpc.call("metrics")).splitlines():
            if line.startswith("monitor_subscribers_dropped_total "):
                return float(line.split()[1])
        raise BenchError("the daemon's metrics have no monitor_subscribers_dropped_total")

    def churn(self, events: int) -> float:
        """`events` lock events (acquire, release, acquire, ...) from CHURN_CONNECTIONS connections at
        once, each on a directory of its own; returns the seconds it took."""
        from monitor.client import Client

        pairs = max(1, events // (2 * CHURN_CONNECTIONS))
        errors: list[str] = []

        def work(i: int) -> None:
            directory = self.work / "churn" / str(i)
            directory.mkdir(parents=True, exist_ok=True)
            try:
                with Client(self.daemon.socket_path, timeout_s=60) as client:
                    for _ in range(pairs):
                        client.call("lock.acquire", directory=str(directory), by="bench", reason="notify churn")
                        client.call("lock.release", directory=str(directory))
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(i,), name=f"notify-churn-{i}") for i in range(CHURN_CONNECTIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise BenchError(f"lock churn failed: {errors[0]}")
        return time.perf_counter() - t0


def notify_daemon_sample(rig: NotifyRig, wait: Callable[[str, float], int | None]) -> dict[str, Any] | None:
    """A sleeper of ours attached as a session (lock=False), SIGKILLed at t0; `wait(session id)`
    says when its `session.stopped` reached us. Reaped after. None: it never came."""
    child, pidfd = spawn_sleeper()
    try:
        session_id = rig.attach(child.pid)
        wall0, t0 = time.time(), time.monotonic_ns()
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        t1 = wait(session_id, NOTIFY_TIMEOUT_S)
    finally:
        reap_sleeper(child, pidfd)
    return None if t1 is None else {"id": session_id, "wall0": wall0, "latency_us": (t1 - t0) / 1000}


def notify_baseline_sample(tag: str, tell: Callable[[str], None], wait: Callable[[str, float], int | None]) -> dict[str, Any] | None:
    """A sleeper SIGKILLed at t0; we wait for its exit on its pidfd, `tell(tag)` (POST it, or
    write a line), and `wait(tag)` says when that arrived. Reaped after."""
    child, pidfd = spawn_sleeper()
    try:
        t0 = time.monotonic_ns()
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if not select.select([pidfd], [], [], NOTIFY_TIMEOUT_S)[0]:
            raise BenchError(f"process {child.pid} did not exit on SIGKILL")
        tell(tag)
        t1 = wait(tag, NOTIFY_TIMEOUT_S)
    finally:
        reap_sleeper(child, pidfd)
    return None if t1 is None else {"latency_us": (t1 - t0) / 1000}


def hook_arrival(rig: NotifyRig) -> Callable[[str, float], int | None]:
    def wait(tag: str, timeout_s: float) -> int | None:
        got = rig.wait_hook(tag, timeout_s)
        return None if got is None else got[0]
    return wait


def notify_phase(ctx: Ctx, rig: NotifyRig, key: str, n: int, round_: int) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """`n` samples of one measure (after the warm-up ones); the misses; what else it saw."""
    extra: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    missed = 0
    closers: list[Callable[[], None]] = []
    try:
        if key in ("subscriber", "stalled"):
            # The same lock churn before both, so that the stalled subscriber is the only difference.
            extra["churn_s"] = rig.churn(ctx.sizes.notify_churn_events)
        if key == "stalled":
            stalled = StalledSubscriber(rig.daemon.socket_path)
            closers.append(stalled.close)
            extra["rcvbuf"] = stalled.rcvbuf
            extra["churn_s"] = rig.churn(ctx.sizes.notify_churn_events)
            extra["before"] = stalled.state(rig.last_event_id())
        sample: Callable[[int], dict[str, Any] | None]
        if key == "webhook":
            wait = hook_arrival(rig)
            def sample(i: int) -> dict[str, Any] | None:
                return notify_daemon_sample(rig, wait)
        elif key == "webhook_baseline":
            def post(tag: str) -> None:
                status = rig.poster.post(tag)
                if status != 200:
                    raise BenchError(f"the receiver answered the baseline's POST with {status}")
            wait = hook_arrival(rig)
            def sample(i: int) -> dict[str, Any] | None:
                return notify_baseline_sample(f"r{round_}-{i}", post, wait)
        elif key in ("subscriber", "stalled"):
            subscriber = subscriber_arrivals(rig.daemon.socket_path)
            closers.append(subscriber.close)
            def sample(i: int) -> dict[str, Any] | None:
                return notify_daemon_sample(rig, subscriber.wait)
        else:
            writer, lines = socketpair_arrivals()
            closers.append(lines.close)
            def sample(i: int) -> dict[str, Any] | None:
                return notify_baseline_sample(f"r{round_}-{i}", lambda tag: writer.sendall(tag.encode() + b"\n"), lines.wait)
        for i in range(ctx.sizes.lat_warmup + n):
            got = sample(i)
            if i < ctx.sizes.lat_warmup:
                continue
            if got is None:
                missed += 1
            else:
                samples.append(got)
        if key == "stalled":
            extra["after"] = stalled.state(rig.last_event_id())
            if round_ == ctx.sizes.notify_rounds - 1:  # the last one: go on until the daemon cuts it off
                extra["cut_off"] = notify_cut_off(ctx, rig, stalled)
    finally:
        for close in reversed(closers):
            close()
    return samples, missed, extra


def notify_cut_off(ctx: Ctx, rig: NotifyRig, stalled: StalledSubscriber) -> dict[str, Any]:
    """More lock churn, 1,000 events at a time, until the daemon counts a subscriber dropped."""
    dropped0 = rig.dropped_subscribers()
    limit = 4 * NOTIFY_SUBSCRIBER_BUFFER
    t0 = time.perf_counter()
    churned = 0
    while rig.dropped_subscribers() == dropped0 and churned < limit:
        rig.churn(1000)
        churned += 1000
    seconds = time.perf_counter() - t0
    last = rig.last_event_id()
    dropped = rig.dropped_subscribers() - dropped0
    return {"cut_off": dropped >= 1, "dropped_subscribers": dropped, "churn_events": churned, "churn_s": seconds,
            "published_at_detection": last - stalled.last_id, **stalled.read_to_end(10.0)}


def notify_burst(ctx: Ctx, rig: NotifyRig, key: str) -> dict[str, Any]:
    """`notify_burst_n` sleepers SIGKILLed together (a loop of pidfd_send_signal); the first and
    the last notification's arrival after the first kill, and the CPU the sender spent: the
    daemon's (all its threads, kill → last arrival), or this process's (kill → last one sent)."""
    n = ctx.sizes.notify_burst_n
    children: list[tuple[subprocess.Popen[bytes], int]] = []
    closers: list[Callable[[], None]] = []
    arrivals: list[int | None] = []
    extra: dict[str, Any] = {}
    if key == "webhook":  # what the endpoint had not sent yet before: nothing, normally
        extra["daemon_pending_before"] = rig.rpc.call("webhook.list")["endpoints"][0]["pending"]
    try:
        for _ in range(n):
            children.append(spawn_sleeper())
        if key in ("webhook_baseline", "subscriber_baseline"):
            tell: Callable[[str], object] = rig.poster.post
            wait = hook_arrival(rig)
            if key == "subscriber_baseline":
                writer, lines = socketpair_arrivals()
                closers.append(lines.close)
                tell, wait = (lambda tag: writer.sendall(tag.encode() + b"\n")), lines.wait
            tags = {pidfd: f"burst-{key}-{i}" for i, (_child, pidfd) in enumerate(children)}
            poller = select.poll()
            for pidfd in tags:
                poller.register(pidfd, select.POLLIN)
            cpu0, t0 = cpu_us(), time.monotonic_ns()
            for _child, pidfd in children:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            pending = dict(tags)
            while pending:
                ready = poller.poll(NOTIFY_TIMEOUT_S * 1000)
                if not ready:
                    raise BenchError(f"{len(pending)} of {n} processes did not exit on SIGKILL")
                for pidfd, _mask in ready:
                    poller.unregister(pidfd)
                    tell(pending.pop(pidfd))
            cpu_s = (cpu_us() - cpu0) / 1e6
            ids = list(tags.values())
        else:
            wait = hook_arrival(rig)
            if key == "subscriber":
                subscriber = subscriber_arrivals(rig.daemon.socket_path)
                closers.append(subscriber.close)
                wait = subscriber.wait
            ids = [rig.attach(child.pid) for child, _pidfd in children]
            cpu0_s, t0 = proc_cpu_s(rig.daemon.pid), time.monotonic_ns()
            for _child, pidfd in children:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        wait_s = 10 + n / 50  # a healthy daemon needs well under a second
        deadline = time.monotonic() + wait_s
        arrivals = [wait(tag, max(0.0, deadline - time.monotonic())) for tag in ids]
        if "baseline" not in key:
            cpu_s = proc_cpu_s(rig.daemon.pid) - cpu0_s
        lost = sum(t is None for t in arrivals)
        if lost and key == "webhook":
            pending = rig.rpc.call("webhook.list")["endpoints"][0]["pending"]
            extra.update(daemon_pending_after=pending,
                         error=f"{lost} of {n} webhooks had not arrived {wait_s:g} s after the kill; the daemon still "
                               f"counted {pending} deliveries pending for the endpoint")
        elif lost:
            extra["error"] = f"{lost} of {n} notifications had not arrived {wait_s:g} s after the kill"
    finally:
        for close in closers:
            close()
        for child, pidfd in children:
            reap_sleeper(child, pidfd)
    got = [(t - t0) / 1e9 for t in arrivals if t is not None]
    return {"n": n, "arrived": len(got), "first_s": min(got, default=None), "last_s": max(got, default=None),
            "sender_cpu_s": cpu_s, "sender_cpu_us_each": cpu_s / n * 1e6, **extra}


def summarize_notify(samples: list[dict[str, Any]], missed: int) -> dict[str, Any]:
    lat = sorted(s["latency_us"] for s in samples)
    return {"n": len(lat), "missed": missed, **spread(lat), "mean_us": sum(lat) / len(lat) if lat else None,
            "samples_us": [round(x, 1) for x in lat]}


def notify_breakdown(rig: NotifyRig, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a daemon sample's time went, by its session's own stamp: `stopped_at` is the wall
    time at which the engine took in the `Exited` (before the commit); kill → that, and that →
    the notification read here (the commit, the delivery)."""
    sessions = {s["id"]: s for s in rig.rpc.call("session.list", all=True)}
    to_stop, after = [], []
    for sample in samples:
        session = sessions.get(sample["id"])
        if session is None or session.get("stopped_at") is None:
            continue
        decided_us = (session["stopped_at"] - sample["wall0"]) * 1e6
        to_stop.append(decided_us)
        after.append(sample["latency_us"] - decided_us)
    return {"matched": len(to_stop), "kill_to_stop_decided_us": median(to_stop), "stop_decided_to_arrival_us": median(after)}


def bench_notify(ctx: Ctx) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="notify-", dir=ctx.tmp))
    rounds, total = ctx.sizes.notify_rounds, ctx.sizes.notify_n
    samples: dict[str, list[dict[str, Any]]] = {key: [] for key in NOTIFY_MEASURES}
    missed = dict.fromkeys(NOTIFY_MEASURES, 0)
    stall: dict[str, Any] = {"rounds": []}
    churn_s: list[float] = []
    rig: NotifyRig | None = None
    ok = False
    try:
        rig = NotifyRig(ctx, work)
        rss_before = proc_rss_kib(rig.daemon.pid)
        for r in range(rounds):
            # Interleaved, in a rotated order, as in the other benchmarks: slow phases of this VM hit all.
            order = NOTIFY_MEASURES[r % len(NOTIFY_MEASURES):] + NOTIFY_MEASURES[: r % len(NOTIFY_MEASURES)]
            for key in order:
                n = total // rounds + (1 if r < total % rounds else 0)
                log(f"notify round {r + 1}/{rounds}: {key} x{n}")
                got, lost, extra = notify_phase(ctx, rig, key, n, r)
                samples[key] += got
                missed[key] += lost
                churn_s += [extra["churn_s"]] if "churn_s" in extra else []
                if key == "stalled":
                    stall["rcvbuf"] = extra["rcvbuf"]
                    stall["rounds"].append({"before": extra["before"], "after": extra["after"]})
                    if "cut_off" in extra:
                        stall["cut_off"] = extra["cut_off"]
        log(f"notify bursts: {ctx.sizes.notify_burst_n} processes SIGKILLed at once")
        bursts = {key: notify_burst(ctx, rig, key) for key in ("webhook_baseline", "webhook", "subscriber_baseline", "subscriber")}
        results = {key: {"label": NOTIFY_LABELS[key], "baseline": NOTIFY_BASELINE_OF[key], **summarize_notify(samples[key], missed[key])}
                   for key in NOTIFY_MEASURES}
        for key in ("webhook", "subscriber", "stalled"):
            results[key]["breakdown_median_us"] = notify_breakdown(rig, samples[key])
        daemon_info = {"source": rig.hello.get("source"), "pid": rig.daemon.pid, "rss_kib_before": rss_before,
                       "rss_kib_at_end": proc_rss_kib(rig.daemon.pid)}
        signatures_bad = rig.signatures_bad
        ok = True
    finally:
        status = rig.close(abandon=not ok) if rig is not None else None
    if status != 0:
        raise BenchError(f"the daemon exited with {status} on SIGTERM:\n{rig.daemon.output() if rig else ''}")
    for res in results.values():
        base = results[res["baseline"]]
        res["ratio_p50"] = ratio(res["p50_us"], base["p50_us"])
        res["ratio_p99"] = ratio(res["p99_us"], base["p99_us"])
    stalled, alone = results["stalled"], results["subscriber"]
    stalled["vs_subscriber_p50"] = ratio(stalled["p50_us"], alone["p50_us"])
    stalled["vs_subscriber_p99"] = ratio(stalled["p99_us"], alone["p99_us"])
    for key, burst in bursts.items():  # no ratio for a burst that lost some: its last arrival is not the last
        burst["last_vs_baseline"] = None if "error" in burst else ratio(burst["last_s"], bursts[NOTIFY_BASELINE_OF[key]]["last_s"])
    stall["churn_events_per_phase"] = ctx.sizes.notify_churn_events
    churn_median_s = median(churn_s)
    stall["churn_events_per_s"] = ctx.sizes.notify_churn_events / churn_median_s if churn_median_s else None
    stall["subscriber_buffer"] = NOTIFY_SUBSCRIBER_BUFFER
    return {"baseline": "the bench's own pidfd wait, then an httpcore POST (webhook) or a socketpair line (subscriber)",
            "rounds": rounds, "warmup": ctx.sizes.lat_warmup, "signatures_bad": signatures_bad,
            "daemon": {**daemon_info, "exit_status": status}, "measures": results, "stall": stall, "burst": bursts}


def notify_tables(res: dict[str, Any]) -> str:
    rows = []
    for key, m in res["measures"].items():
        n = str(m["n"]) + (f" ({m['missed']} missed)" if m["missed"] else "")
        is_base = m["baseline"] == key
        rows.append([m["label"], n, fmt_us(m["p50_us"]), fmt_us(m["p90_us"]), fmt_us(m["p99_us"]), fmt_us(m["max_us"]),
                     "–" if is_base else fmt_x(m["ratio_p50"]), "–" if is_base else fmt_x(m["ratio_p99"]),
                     fmt_x(m.get("vs_subscriber_p50")) + " / " + fmt_x(m.get("vs_subscriber_p99")) if key == "stalled" else "–"])
    table = md_table(["measure", "n", "p50", "p90", "p99", "max", "p50 vs its baseline", "p99 vs its baseline",
                      "p50 / p99 vs not stalled"], rows)
    parts_rows = []
    for key in ("webhook", "subscriber", "stalled"):
        b = res["measures"][key]["breakdown_median_us"]
        parts_rows.append([NOTIFY_LABELS[key], str(b["matched"]), fmt_us(b["kill_to_stop_decided_us"]),
                           fmt_us(b["stop_decided_to_arrival_us"])])
    parts = md_table(["measure", "sessions matched", "kill → the engine took in the exit (`stopped_at`)",
                      "→ notification read (commit, delivery)"], parts_rows)
    burst_labels = {"webhook_baseline": "bench's own pidfd waits + a POST each, in turn (baseline)",
                    "webhook": "daemon: `session.stopped` webhooks",
                    "subscriber_baseline": "bench's own pidfd waits + a socketpair line each (baseline)",
                    "subscriber": "daemon: subscriber lines"}
    burst_rows = [[burst_labels[key], f"{b['arrived']} / {b['n']}", fmt_us(None if b["first_s"] is None else b["first_s"] * 1e6),
                   fmt_us(None if b["last_s"] is None else b["last_s"] * 1e6), fmt_x(b["last_vs_baseline"]) if "baseline" not in key else "–",
                   fmt_us(b["sender_cpu_us_each"])]
                  for key, b in res["burst"].items()]
    burst = md_table(["SIGKILLed at once", "arrived", "first arrival", "last arrival", "last vs baseline",
                      "sender CPU per notification"], burst_rows)
    failures = [f"- {burst_labels[key]}: {b['error']}" for key, b in res["burst"].items() if "error" in b]
    if failures:
        burst += "\n\nFailures:\n\n" + "\n".join(failures)
    st = res["stall"]
    before = [r["before"] for r in st["rounds"]]
    after = [r["after"] for r in st["rounds"]]
    cut = st.get("cut_off", {})
    cut_text = (f"Then, in the last round, more churn until the daemon cut it off: "
                f"{'cut off' if cut.get('cut_off') else 'NOT cut off'} after {cut.get('churn_events', 0):,} more lock events "
                f"({cut.get('churn_s', 0):.1f} s; {cut.get('published_at_detection', 0):,} events published to it by then, "
                f"its buffer is {st['subscriber_buffer']:,}); monitor_subscribers_dropped_total +{cut.get('dropped_subscribers', 0):g}; "
                f"reading it then gave {cut.get('lines_read', 0):,} lines, "
                f"{'the `too_slow` error' if cut.get('too_slow_said') else 'no `too_slow` error'} and "
                f"{'the end of the stream' if cut.get('closed_by_daemon') else 'no end of the stream'}.") if cut else ""
    d = res["daemon"]
    return (
        f"A real `monitor daemon` ({d['source']} source, exit status {d['exit_status']} on SIGTERM) with one webhook "
        f"endpoint (events = [\"session.stopped\"]) on a receiver process of its own on 127.0.0.1 (tests/receiver.py: "
        f"a threaded http.server that stamps each request with CLOCK_MONOTONIC as it is read). Each sample: a "
        f"`sleep` of ours attached with `session.attach` (lock=False), SIGKILLed through its pidfd at t0, reaped "
        f"after; latency = arrival − t0 of that session's notification. Baselines, same kill: this process waits "
        f"on the pidfd, then POSTs a small signed JSON with httpcore to the same receiver, or writes one line over a "
        f"socketpair to a reader thread. {res['rounds']} rounds interleave the five measures, {res['warmup']} warm-up "
        f"samples dropped per phase; signatures that failed the receiver's check: {res['signatures_bad']}. The "
        f"endpoint stays configured throughout: the daemon POSTs each stop during the subscriber measures too.\n\n"
        f"{table}\n\n"
        f"Where the daemon's time goes (medians; `stopped_at` is the daemon's wall clock, the kill's is ours):\n\n{parts}\n\n"
        f"Stalled subscriber: its own connection, subscribed to every event type, SO_RCVBUF {st['rcvbuf']:,} B (as the "
        f"kernel reports it), never read. Before each subscriber measure (stalled or not), "
        f"{st['churn_events_per_phase']:,} lock events of churn from {CHURN_CONNECTIONS} connections "
        f"(~{fmt_num(st['churn_events_per_s'], 0)} events/s); for the stalled one, once more after it subscribed. "
        f"Then its socket held {fmt_num(median([b['socket_bytes'] / 1024 for b in before]))} KiB "
        f"({fmt_num(median([b['socket_lines'] for b in before]), 0)} lines) and the daemon held "
        f"{fmt_num(median([b['held_by_daemon'] for b in before]), 0)} more events for it; after the measure, "
        f"{fmt_num(median([a['held_by_daemon'] for a in after]), 0)} (medians over rounds). {cut_text}\n\n"
        f"Bursts: {res['burst']['webhook']['n']} sleepers SIGKILLed in one loop; arrivals after the first kill. Sender CPU: "
        f"the daemon's, all threads (its whole pipeline: exit, commit, delivery), kill → last arrival; the baseline's, this "
        f"process, kill → last one sent:\n\n{burst}\n\n"
        f"Daemon RSS {d['rss_kib_before'] / 1024:.1f} MiB before, {d['rss_kib_at_end'] / 1024:.1f} MiB at the end."
    )



# ======================================================================================
# Report and entry point
# ======================================================================================

RUNNERS = {"latency": bench_latency, "storm": bench_storm, "scale": bench_scale, "engine": bench_engine,
           "daemon": bench_daemon, "notify": bench_notify, "fleet": bench_fleet}
TABLES = {"latency": latency_tables, "storm": storm_tables, "scale": scale_table, "engine": engine_tables,
          "daemon": daemon_tables, "notify": notify_tables, "fleet": fleet_tables}
TITLES = {"latency": "Exit latency (non-child process, exit → `Exited` in the consumer)",
          "storm": "Fork storm", "scale": "Scale", "engine": "Engine (exit → lock released and committed; sessions at scale)",
          "daemon": "Daemon (socket round trips, locks, `monitor launch`)",
          "notify": "Notifications (exit → webhook received, exit → subscriber line; a stalled subscriber; bursts)",
          "fleet": "Fleet (exit → event read from a NATS JetStream consumer; a burst of stops)"}


def native_status() -> tuple[bool, str | None]:
    from monitor.sources import native

    return bool(native.AVAILABLE), native.REASON


def meta(args: argparse.Namespace, sizes: Sizes, seed: int) -> dict[str, Any]:
    available, reason = native_status()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kernel": platform.release(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "quick": args.quick,
        "sizes": sizes.__dict__, "seed": seed, "native_decoder": "built" if available else "not built",
        "native_reason": reason,
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    out = [f"Measured with `scripts/bench{' --quick' if m['quick'] else ''}` on {m['date'][:10]}: Linux {m['kernel']}, "
           f"{m['cpus']} CPUs, Python {m['python']}. Every ratio is against a baseline measured in the same run.\n"]
    for name in BENCHES:
        if name not in results:
            continue
        out.append(f"### {TITLES[name]}\n")
        res = results[name]
        out.append(f"Failed: {res['error']}\n" if "error" in res else TABLES[name](res) + "\n")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (well under a minute), for tests")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: " + ", ".join(BENCHES))
    parser.add_argument("--out", default="bench-results/latest.json", help="JSON results (the .md snippet goes next to it)")
    parser.add_argument("--seed", type=int, default=None, help="for the random exit phases and sleep times")
    parser.add_argument("--role", choices=("latency", "storm", "scale", "engine", "echo", "client", "receiver"), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.role:
        args.only = [b.strip() for b in args.only.split(",") if b.strip()]
        unknown = set(args.only) - set(BENCHES)
        if unknown or not args.only:
            parser.error(f"--only takes a comma-separated subset of {', '.join(BENCHES)}")
    return args


def run_failures(res: dict[str, Any]) -> list[str]:
    """The errors of single runs (a source failing at one size), wherever they nest."""
    found: list[str] = []
    for value in res.values():
        if isinstance(value, dict):
            found += [value["error"]] if "error" in value else run_failures(value)
    return found


def run_benchmarks(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    results: dict[str, Any] = {"meta": meta(args, sizes, seed)}
    failed = False
    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as tmp:
        ctx = Ctx(build_c_helpers(Path(tmp)), sizes, Path(tmp), native_status()[0], random.Random(seed))
        if not ctx.native:
            log(f"native decoder not built: its rows say so ({results['meta']['native_reason']})")
        for name in (b for b in BENCHES if b in args.only):
            started = time.monotonic()
            try:
                results[name] = RUNNERS[name](ctx)
            except BenchError as err:
                log(f"{name} failed: {err}")
                results[name] = {"error": str(err)}
                failed = True
            if run_failures(results[name]):
                log(f"{name}: some runs failed (see the table); the exit status will say so")
                failed = True
            results[name]["elapsed_s"] = round(time.monotonic() - started, 1)
            if "error" not in results[name]:
                print(f"\n## {TITLES[name]}\n\n{TABLES[name](results[name])}\n", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tidy(results), indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        return run_role(args.role, args.method, args.dump, args.state)
    become_subreaper()
    # SIGTERM must unwind through the finally below like Ctrl-C does, so that
    # every helper (and every helper's children) is reaped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run_benchmarks(args)
    except BenchError as err:
        log(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        log("interrupted: stopping and reaping every helper")
        return 130
    finally:
        close_all_helpers()
        reap_orphans()


if __name__ == "__main__":
    sys.exit(main())
